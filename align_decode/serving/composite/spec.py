"""The composite folder's `align_decode` entry, and the command that writes the folder.

    config.json = the policy's config.json, plus
        "architectures": ["AlignDecodeGuidedForCausalLM"],
        "align_decode": {"version": 1, "policy": "/abs/policy",
                         "guides": [{"name": "helpful", "path": "/abs/arm", "kind": "arm", "width": 49152}]}

No torch and no vLLM here: the build reads configs and tokenizers only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import ARCHITECTURE, CONFIG_KEY

VERSION = 1
KINDS = ("arm", "qhead")
# Copied (small); everything else the policy folder holds is left out, weights are linked.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "generation_config.json")


class CompositeError(ValueError):
    """A composite model cannot be built or loaded as asked."""


@dataclass(frozen=True)
class PackedGuide:
    name: str
    path: str
    kind: str = "arm"
    width: int | None = None  # logits columns shared with the policy tokenizer (None: the guide's vocab)


@dataclass(frozen=True)
class CompositeSpec:
    policy: str
    guides: tuple[PackedGuide, ...]

    def names(self) -> list[str]:
        return [g.name for g in self.guides]

    @classmethod
    def from_entry(cls, raw: Any) -> "CompositeSpec":
        if hasattr(raw, "to_dict"):
            raw = raw.to_dict()
        if not isinstance(raw, Mapping) or "policy" not in raw or "guides" not in raw:
            raise CompositeError(f"the model config's '{CONFIG_KEY}' entry must hold 'policy' and 'guides'; "
                                 "rebuild the folder with `align-decode build-composite`")
        guides = []
        for g in raw["guides"]:
            guides.append(PackedGuide(str(g["name"]), str(g["path"]), str(g.get("kind", "arm")), g.get("width")))
        if not guides:
            raise CompositeError("a composite model needs at least one guide")
        return cls(str(raw["policy"]), tuple(guides))

    @classmethod
    def from_hf_config(cls, hf_config) -> "CompositeSpec | None":
        """The spec of a composite model's config, or None for any other model."""
        raw = getattr(hf_config, CONFIG_KEY, None)
        if raw is None and isinstance(hf_config, Mapping):
            raw = hf_config.get(CONFIG_KEY)
        archs = getattr(hf_config, "architectures", None) or []
        if raw is None or ARCHITECTURE not in archs:
            return None
        return cls.from_entry(raw)


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CompositeError(f"{folder} has no config.json: not a model folder")
    return json.loads(path.read_text())


def _safetensors(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CompositeError(f"{folder} has no .safetensors weights (convert .bin checkpoints first: "
                             "the composite folder links weights, it does not copy them)")
    return files


def _check_tokenizer(policy: Path, policy_cfg: dict, name: str, guide: Path, guide_cfg: dict) -> int:
    """The logits width the guide shares with the policy (raises CompositeError naming both sides)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ...decoding.vocab import shared_width

    def tok(folder):
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            return None

    shim = lambda cfg: SimpleNamespace(config=SimpleNamespace(vocab_size=int(cfg["vocab_size"])))  # noqa: E731
    try:
        return shared_width(shim(policy_cfg), tok(policy), shim(guide_cfg), tok(guide), role=f"guide {name!r}")
    except ValueError as e:
        raise CompositeError(str(e)) from None


def parse_guide_option(value: str) -> tuple[str, str]:
    """NAME=DIR from the command line. A prompted ARM (prompt:...) is refused with the reason."""
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise CompositeError(f"--guide takes NAME=DIR, got {value!r}")
    if path.startswith("prompt:") or path.startswith("prompted:"):
        raise CompositeError(
            f"guide {name!r} is a prompted ARM (a model read under another instruction): it cannot be packed, "
            "because every packed guide reads exactly the policy's token sequence, and its prompt would need "
            "its own prefix. The vLLM logits-processor path ($ALIGN_DECODE_GUIDES) does not take prompted "
            "ARMs either (it loads trained guide folders). Serve it with `align-decode serve` (method genarm "
            "with arm_prompt, run in process on the Hugging Face backend), or train an ARM "
            "(`align-decode train-arm`) and pack that")
    return name.strip(), path.strip()


def build_composite(policy: str | Path, guides: Mapping[str, str | Path], out: str | Path,
                    kinds: Mapping[str, str] | None = None, force: bool = False) -> dict:
    """Write a composite model folder; returns a summary (what was linked, copied, and its size)."""
    policy, out = Path(policy).resolve(), Path(out)
    kinds = dict(kinds or {})
    if not guides:
        raise CompositeError("give at least one guide (--guide NAME=DIR)")
    pcfg = _config(policy)
    if ARCHITECTURE in (pcfg.get("architectures") or []):
        raise CompositeError(f"{policy} is already a composite model; give the plain policy folder")
    weights = _safetensors(policy)
    packed = []
    for name, folder in guides.items():
        folder = Path(folder).resolve()
        gcfg = _config(folder)
        _safetensors(folder)
        if gcfg.get("is_encoder_decoder"):
            raise CompositeError(f"guide {name!r} at {folder} is an encoder-decoder; guides are causal LMs")
        kind = kinds.get(name, "arm")
        if kind not in KINDS:
            raise CompositeError(f"guide {name!r}: kind must be one of {KINDS}, got {kind!r}")
        width = _check_tokenizer(policy, pcfg, name, folder, gcfg)
        packed.append({"name": name, "path": str(folder), "kind": kind, "width": int(width)})
    if len({g["name"] for g in packed}) != len(packed):
        raise CompositeError("guide names must be distinct")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CompositeError(f"{out} exists and is not empty (pass --force to overwrite it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    cfg = dict(pcfg)
    cfg["architectures"] = [ARCHITECTURE]
    cfg[CONFIG_KEY] = {"version": VERSION, "policy": str(policy), "guides": packed}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copied, linked, linked_bytes = ["config.json"], [], 0
    for fname in _TOKENIZER_FILES:
        if (policy / fname).is_file():
            shutil.copy2(policy / fname, out / fname)
            copied.append(fname)
    index = policy / "model.safetensors.index.json"
    for src in weights + ([index] if index.is_file() else []):
        os.symlink(src.resolve(), out / src.name)
        linked.append(src.name)
        linked_bytes += src.resolve().stat().st_size
    copied_bytes = sum((out / f).stat().st_size for f in copied)
    return {"out": str(out), "policy": str(policy), "guides": packed, "copied": copied, "linked": linked,
            "copied_bytes": copied_bytes, "linked_bytes": linked_bytes}
