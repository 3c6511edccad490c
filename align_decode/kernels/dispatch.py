"""The one entry point for a decoding step's mix-and-sample: CUDA tensors go to the Triton kernel,
everything else to the torch reference. The decoding loop and the vLLM plugin call only this."""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .reference import SampleOutput, mix_and_sample_reference
from .rows import SamplingRows


def _triton_sampler():
    if os.environ.get("ALIGN_DECODE_DISABLE_TRITON") == "1":
        return None
    try:
        from .triton_mix import mix_and_sample_triton
    except ImportError:
        return None
    return mix_and_sample_triton


def sample_next(
    policy: torch.Tensor,
    guides: Sequence[torch.Tensor] = (),
    weights: torch.Tensor | None = None,
    rows: SamplingRows | None = None,
    step: torch.Tensor | int = 0,
    noise: torch.Tensor | None = None,
    return_logprobs: bool = False,
    *,
    backend: str = "auto",
) -> SampleOutput:
    """Mix policy scores [B, V] with guide scores (each [B, V]) under per-row weights [B, R], truncate
    and draw one token per row. See `kernels.reference` for the exact law.

    backend: "auto" sends CUDA tensors to the Triton kernel (when triton imports) and the rest to the torch
    reference; "torch" always uses the reference; "triton" always uses the kernel, which on CPU tensors
    works only under the Triton interpreter (TRITON_INTERPRET=1 before triton is imported): for tests.
    """
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
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
    if backend == "triton":
        # Asked for by name: ALIGN_DECODE_DISABLE_TRITON does not apply, and a missing triton is an error.
        try:
            from .triton_mix import mix_and_sample_triton as fused
        except ImportError as err:
            raise RuntimeError("backend='triton' needs triton: pip install triton==3.7.1") from err
    elif backend == "auto" and policy.is_cuda:
        fused = _triton_sampler()
    if fused is not None:
        return fused(policy, guides, weights, rows, step, noise=noise, return_logprobs=return_logprobs)
    return mix_and_sample_reference(policy, guides, weights, rows, step, noise=noise, return_logprobs=return_logprobs)
