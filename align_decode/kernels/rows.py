"""Per-row sampling settings and the per-row random stream.

Every row of a decoding batch carries its own temperature, truncation settings and seed, so one
batch can mix requests with different settings, and a row's draw depends only on its own seed and
step, never on which other rows share the batch or where the row sits in it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit unsigned constant as the signed int64 torch stores."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> is arithmetic on int64; mask the sign-extended bits to get a logical shift.
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic): a strong 64-bit integer hash."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def derive_seeds(seed: int | torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
    """Child seeds keyed by (parent seed, index): e.g. one per return sequence or per MCMC step."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    index = torch.as_tensor(index, dtype=torch.int64, device=seed.device)
    return splitmix64(splitmix64(seed) ^ index)


def row_uniform(seed: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """One uniform in [0, 1) per row, a pure function of (seed, step), in float64 (53 random bits)."""
    step = torch.as_tensor(step, dtype=torch.int64, device=seed.device)
    z = splitmix64(splitmix64(seed) + step)
    return _shr(z, 11).to(torch.float64) * (2.0**-53)


@dataclass
class SamplingRows:
    """Per-row settings of one decoding step, each a tensor of shape [B].

    temperature: divides the policy scores (1 = unchanged). Greedy rows use 1.
    top_k: keep the k most likely tokens; 0 turns it off.
    top_p: keep the smallest set of most likely tokens with mass >= top_p; 1 turns it off.
    min_p: keep tokens with probability >= min_p * (largest probability); 0 turns it off.
    greedy: take the argmax instead of drawing.
    seed: the row's random stream; with the step it fixes the row's uniform draw.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    greedy: torch.Tensor
    seed: torch.Tensor

    @classmethod
    def build(
        cls,
        batch_size: int,
        *,
        temperature: float | Sequence[float] | torch.Tensor = 1.0,
        top_k: int | Sequence[int] | torch.Tensor = 0,
        top_p: float | Sequence[float] | torch.Tensor = 1.0,
        min_p: float | Sequence[float] | torch.Tensor = 0.0,
        greedy: bool | Sequence[bool] | torch.Tensor = False,
        seed: int | Sequence[int] | torch.Tensor = 0,
        device: torch.device | str = "cpu",
    ) -> "SamplingRows":
        def col(value, dtype):
            t = torch.as_tensor(value, dtype=dtype, device=device)
            if t.ndim == 0:
                t = t.expand(batch_size)
            if t.shape != (batch_size,):
                raise ValueError(f"per-row setting has shape {tuple(t.shape)}, expected ({batch_size},)")
            return t.contiguous()

        greedy_col = col(greedy, torch.bool)
        rows = cls(
            # Greedy rows take the argmax of the mix at temperature 1, as model.generate() ignores it.
            temperature=torch.where(greedy_col, 1.0, col(temperature, torch.float32)),
            top_k=col(top_k, torch.int64),
            top_p=col(top_p, torch.float32),
            min_p=col(min_p, torch.float32),
            greedy=greedy_col,
            seed=col(seed, torch.int64),
        )
        rows.validate()
        return rows

    def validate(self) -> None:
        if bool((self.temperature <= 0).any()) or not bool(torch.isfinite(self.temperature).all()):
            raise ValueError("temperature must be a finite number > 0 (use greedy decoding for temperature 0)")
        if bool((self.top_k < 0).any()):
            raise ValueError("top_k must be >= 0 (0 turns it off)")
        if bool(((self.top_p <= 0) | (self.top_p > 1)).any()):
            raise ValueError("top_p must be in (0, 1] (1 turns it off)")
        if bool(((self.min_p < 0) | (self.min_p > 1)).any()):
            raise ValueError("min_p must be in [0, 1] (0 turns it off)")

    def select(self, index: torch.Tensor) -> "SamplingRows":
        """Rows picked (or repeated) by index, as for forking or dropping finished rows."""
        return SamplingRows(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def any_filter(self) -> bool:
        return bool((self.top_k > 0).any() or (self.top_p < 1).any() or (self.min_p > 0).any())
