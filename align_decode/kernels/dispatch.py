"""The one entry point for a decoding step's mix-and-sample: CUDA tensors go to the Triton kernel,
everything else to the torch reference. The decoding loop and the vLLM plugin call only this."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import warnings
from typing import Callable, Sequence

import torch

from ..errors import AlignDecodeWarning
from .reference import SampleOutput, mix_and_sample_reference
from .rows import SamplingRows

logger = logging.getLogger(__name__)

TRITON_INSTALL = "pip install 'align-decode[triton]'"
# What the kernel reads from triton beyond its core (`triton.jit`, `tl.load`, ...): a release without one
# of these imports fine and then fails at the first launch, so it is checked before the kernel is chosen.
REQUIRED_TRITON_ATTRIBUTES = (
    "knobs.runtime.interpret",
    "cdiv",
    "next_power_of_2",
    "language.cumsum",
    "language.math.div_rn",
)


def _missing_attributes(module, dotted_names: Sequence[str]) -> list[str]:
    missing = []
    for dotted in dotted_names:
        obj = module
        for part in dotted.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                try:  # a submodule that was not imported yet (triton.language.extra.libdevice)
                    obj = importlib.import_module(f"{obj.__name__}.{part}")
                except (ImportError, AttributeError):
                    missing.append(f"{module.__name__}.{dotted}")
                    break
    return missing


def _choose_fused() -> tuple[Callable | None, str]:
    """(the fused kernel or None, why): decided once per process, on the first CUDA step."""
    if os.environ.get("ALIGN_DECODE_DISABLE_TRITON") == "1":
        return None, "ALIGN_DECODE_DISABLE_TRITON=1 is set"
    if importlib.util.find_spec("triton") is None:
        return None, f"triton is not installed ({TRITON_INSTALL})"
    version = importlib.metadata.version("triton")
    try:
        import triton
    except Exception as e:  # a broken install raises more than ImportError
        return None, f"triton {version} does not import: {type(e).__name__}: {e}"
    missing = _missing_attributes(triton, REQUIRED_TRITON_ATTRIBUTES)
    if missing:
        return None, f"triton {version} lacks {', '.join(missing)}, which the kernel uses ({TRITON_INSTALL})"
    try:
        from .triton_mix import mix_and_sample_triton
    except Exception as e:
        return None, f"the Triton kernel does not load with triton {version}: {type(e).__name__}: {e}"
    return mix_and_sample_triton, f"triton {version}"


@functools.cache
def fused_sampler() -> Callable | None:
    """The Triton kernel for CUDA tensors, or None to use the torch reference; chosen once and logged, with
    a warning when a kernel that could not be used falls back to the reference."""
    fused, why = _choose_fused()
    if fused is not None:
        logger.info("align-decode samples CUDA tensors with the Triton kernel (%s)", why)
    elif why.startswith("ALIGN_DECODE_DISABLE_TRITON"):
        logger.info("align-decode samples CUDA tensors with the torch reference (%s)", why)
    else:
        logger.info("align-decode samples CUDA tensors with the torch reference: %s", why)
        warnings.warn(f"the Triton kernel is not used, CUDA steps run the slower torch reference: {why}",
                      AlignDecodeWarning, stacklevel=3)
    return fused


def sample_next(
    policy: torch.Tensor,
    guides: Sequence[torch.Tensor] = (),
    weights: torch.Tensor | None = None,
    rows: SamplingRows | None = None,
    step: torch.Tensor | int = 0,
    noise: torch.Tensor | None = None,
    return_logprobs: bool = False,
    *,
    implementation: str = "auto",
) -> SampleOutput:
    """Mix policy scores [B, V] with guide scores (each [B, V]) under per-row weights [B, R], truncate
    and draw one token per row. See `kernels.reference` for the exact law.

    implementation: "auto" sends CUDA tensors to the Triton kernel (when the installed triton has what it needs:
    `fused_sampler`) and the rest to the torch reference; "torch" always uses the reference; "triton" always uses the kernel, which on CPU tensors
    works only under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported): for tests.
    """
    if implementation not in ("auto", "torch", "triton"):
        raise ValueError(f"implementation must be 'auto', 'torch' or 'triton', got {implementation!r}")
    batch, vocab = policy.shape
    if rows is None:
        rows = SamplingRows.build(batch, device=policy.device)
    if guides and (weights is None or tuple(weights.shape) != (batch, len(guides))):
        got = None if weights is None else tuple(weights.shape)
        raise ValueError(f"weights must have shape ({batch}, {len(guides)}) for {len(guides)} guide(s), got {got}")
    for i, g in enumerate(guides):
        if tuple(g.shape) != (batch, vocab):
            raise ValueError(f"guide {i} scores have shape {tuple(g.shape)}, policy has ({batch}, {vocab})")
    fused = None
    if implementation == "triton":
        # Asked for by name: ALIGN_DECODE_DISABLE_TRITON does not apply, and a missing triton is an error.
        try:
            from .triton_mix import mix_and_sample_triton as fused
        except ImportError as err:
            raise RuntimeError(f"implementation='triton' needs triton: {TRITON_INSTALL}") from err
        return fused(policy, guides, weights, rows, step, noise=noise, return_logprobs=return_logprobs)
    if implementation == "auto" and _on_gpu(policy):
        fused = fused_sampler()
    if fused is not None and _FAILED is None:
        try:
            return fused(policy, guides, weights, rows, step, noise=noise, return_logprobs=return_logprobs)
        except Exception as e:
            _give_up_on_kernel(e)
    return mix_and_sample_reference(policy, guides, weights, rows, step, noise=noise, return_logprobs=return_logprobs)


def _on_gpu(scores: torch.Tensor) -> bool:
    return scores.is_cuda


# Why the kernel failed at a launch in this process (then every later step uses the reference), or None.
_FAILED: str | None = None


def _give_up_on_kernel(error: Exception) -> None:
    """A Triton error at a launch (compilation, resources: a GPU or triton release the kernel was not
    checked on) falls back to the reference for the rest of the process, loudly; any other error is ours
    or the caller's and propagates."""
    global _FAILED
    if not type(error).__module__.startswith("triton"):
        raise error
    _FAILED = f"{type(error).__name__}: {error}"
    logger.warning("the Triton kernel failed at its launch; CUDA steps use the torch reference: %s", _FAILED)
    warnings.warn(f"the Triton kernel failed at its launch, CUDA steps run the slower torch reference from now "
                  f"on: {_FAILED}", AlignDecodeWarning, stacklevel=3)
