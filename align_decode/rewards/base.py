"""The interface of sequence-level rewards: text in, one float per (prompt, completion) pair."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from typing import Sequence

import torch


class SequenceReward(ABC):
    """A reward r(x, y) on text. Subclasses implement `_score`; `score` checks what comes back.

    Example:
        >>> class Length(SequenceReward):
        ...     def _score(self, prompts, completions):
        ...         return torch.tensor([float(len(c)) for c in completions])
        >>> Length().score(["hi"], ["hello"])
        tensor([5.])
    """

    name: str = "reward"

    @abstractmethod
    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Rewards for each pair, any float tensor or sequence of length B."""

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Rewards [B] (float32, CPU) for prompts[i] answered by completions[i]."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if len(prompts) == 0:
            return torch.zeros(0)
        out = self._score(list(prompts), list(completions))
        out = torch.as_tensor(out, dtype=torch.float32).detach().cpu()
        if out.shape != (len(prompts),):
            raise ValueError(
                f"reward {self.name!r} returned shape {tuple(out.shape)} for {len(prompts)} pairs; "
                f"expected ({len(prompts)},)"
            )
        if bool(torch.isnan(out).any()):
            bad = torch.isnan(out).nonzero().flatten().tolist()
            raise ValueError(f"reward {self.name!r} returned NaN for pair(s) {bad}")
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return self.score(prompts, completions)

    # Sugar for weighted sums: `a + b`, `a - b`, `0.5 * a`, `-a` and `sum([a, b])` all build a
    # `WeightedSum` (imported late: combine.py subclasses this class).
    def _terms(self, weight: float = 1.0) -> list:
        from .combine import WeightedSum

        if isinstance(self, WeightedSum):
            return [(r, w * weight) for r, w in self.terms]
        return [(self, weight)]

    def __add__(self, other):
        if not isinstance(other, SequenceReward):
            return NotImplemented
        from .combine import WeightedSum

        return WeightedSum(self._terms() + other._terms())

    def __radd__(self, other):
        # sum() starts from the integer 0
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other):
        if not isinstance(other, SequenceReward):
            return NotImplemented
        from .combine import WeightedSum

        return WeightedSum(self._terms() + other._terms(-1.0))

    def __mul__(self, weight):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            return NotImplemented
        from .combine import WeightedSum

        return WeightedSum(self._terms(float(weight)))

    __rmul__ = __mul__

    def __neg__(self):
        return self * -1.0
