"""The interface of sequence-level rewards: text in, one float per (prompt, completion) pair."""

from __future__ import annotations

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
