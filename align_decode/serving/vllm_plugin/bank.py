"""The guide models a vLLM processor mixes in: loaded once, checked against the policy's vocabulary.

A guide is a transformers causal LM run by this project's `ModelSession` beside vLLM (it keeps its own
KV cache; vLLM's paged cache holds only the policy). Its scores are cut to the width it shares with the
policy tokenizer, so a guide with padding rows, or a policy whose vLLM logits are wider than its
tokenizer, still adds scores token id by token id.

Banks are cached per process: vLLM may build its persistent batch (and so the processor) more than
once during start-up, and the weights should be read once.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from ...decoding.session import ModelSession
from ...decoding.vocab import shared_width
from .config import GuideConfig, GuideSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedGuide:
    """One guide ready to run: the model, its device and the logits width shared with the policy."""

    spec: GuideSpec
    model: Any
    width: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_session(self) -> ModelSession:
        return ModelSession(self.model, vocab_size=self.width)


@dataclass
class PolicyVocab:
    """What the processor knows about the policy: its logits width in vLLM and, when it can be loaded,
    its tokenizer (to check that guides index the same tokens)."""

    logits_width: int
    tokenizer: Any = None

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "PolicyVocab":
        mc = vllm_config.model_config
        tokenizer = None
        if not getattr(mc, "skip_tokenizer_init", False) and getattr(mc, "tokenizer", None):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                mc.tokenizer,
                revision=getattr(mc, "tokenizer_revision", None),
                trust_remote_code=bool(getattr(mc, "trust_remote_code", False)),
            )
        return cls(int(mc.get_vocab_size()), tokenizer)


def _load_model(spec: GuideSpec, device: torch.device):
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": spec.trust_remote_code}
    kwargs["dtype"] = "auto" if spec.dtype == "auto" else _DTYPES[spec.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.path, **kwargs)
    except OSError as e:
        raise ValueError(f"align-decode guide {spec.name!r}: cannot load a model from {spec.path!r}: {e}") from e
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"align-decode guide {spec.name!r} at {spec.path!r} is an encoder-decoder; guides are causal LMs"
        )
    return model.to(device).eval()


def _load_tokenizer(spec: GuideSpec):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec.tokenizer or spec.path, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError):
        if spec.tokenizer:  # asked for explicitly: a missing tokenizer is an error
            raise
        return None  # no tokenizer in the model folder: widths must then match exactly


@torch.no_grad()
def _smoke_test(guide: LoadedGuide) -> None:
    """Run what the processor will do (prefill, step, drop a row, merge) on two one-token rows, so an
    unsupported guide fails at start-up with a clear message instead of mid-serving."""
    dev = guide.device
    try:
        a = guide.new_session()
        a.prefill(torch.zeros(2, 1, dtype=torch.long, device=dev))
        a.step(torch.zeros(2, dtype=torch.long, device=dev))
        a.select(torch.tensor([1], device=dev))
        ModelSession.concat([a, a])  # also checks the cache is a full-attention key/value cache
    except Exception as e:
        raise ValueError(
            f"align-decode guide {guide.name!r} ({type(guide.model).__name__}) cannot be run incrementally "
            f"with per-request caches: {e}"
        ) from e


class GuideBank:
    """All configured guides, loaded for one policy on one default device."""

    def __init__(self, guides: dict[str, LoadedGuide]):
        self.guides = guides

    def __getitem__(self, name: str) -> LoadedGuide:
        return self.guides[name]

    def __contains__(self, name: str) -> bool:
        return name in self.guides

    def __len__(self) -> int:
        return len(self.guides)

    @property
    def common_width(self) -> int:
        return min((g.width for g in self.guides.values()), default=0)

    @classmethod
    def load(cls, config: GuideConfig, policy: PolicyVocab, device: torch.device) -> "GuideBank":
        shim = SimpleNamespace(config=SimpleNamespace(vocab_size=policy.logits_width))
        guides = {}
        for name, spec in config.guides.items():
            model = _load_model(spec, torch.device(spec.device) if spec.device else device)
            tok = _load_tokenizer(spec)
            # Raises a ValueError naming both vocabularies when the guide does not share the policy's tokens.
            width = shared_width(shim, policy.tokenizer, model, tok, role=f"guide {name!r}")
            guide = LoadedGuide(spec, model, min(width, policy.logits_width))
            _smoke_test(guide)
            guides[name] = guide
        return cls(guides)


_BANKS: dict[tuple, GuideBank] = {}


def shared_bank(config: GuideConfig, policy: PolicyVocab, device: torch.device) -> GuideBank:
    """The process's bank for this configuration, policy vocabulary and device (loaded on first use)."""
    key = (tuple(sorted(config.guides.items())), policy.logits_width,
           getattr(policy.tokenizer, "name_or_path", None), str(device))
    if key not in _BANKS:
        _BANKS[key] = GuideBank.load(config, policy, device)
    return _BANKS[key]
