"""The guide interface: what a token-level method plugs into the decoding loop.

A guide adds weighted scores to the policy's next-token scores every step,

    z = log p_policy / T + sum_i w_i * score_i,

and keeps whatever state it needs (a KV cache of its own model, the rows' prefixes) in step with the
policy. Two objects per guide:

- `Guide`, the configured thing a user builds once (an ARM, a value model, a reward on prefixes). It
  says which vocabulary width it shares with a policy (`width_for`, which also refuses a mismatched
  tokenizer) and starts a state for a batch (`start(context)`).
- `GuideState`, its running state for one batch, which the loop drives: `next_scores` before each draw,
  `advance` with the drawn tokens, `select` when rows are dropped, reordered or forked.

`GuideContext` carries everything a guide may need at start, so adding a need never changes every
guide's signature: the rows, the width, the settings and per-row seeds, the policy's tokenizer (to read
text), and the policy's own session (a guide on the policy's model may reuse its cache).

A new token-level method is one Guide subclass plus a strategy that returns it from `guides()` (see
the README's developer notes for a worked example).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from ..prompts import PromptBatch

if TYPE_CHECKING:
    from ..session import ModelSession
    from ..settings import GenerationSettings


class GuideState(Protocol):
    """A guide's running state for one batch, kept in step with the policy by the loop.

    next_scores gets the policy's next-token logits [B, V] and returns the guide's scores [B, V] for the
    current prefixes: a guide model ignores the logits (its scores come from its own forward pass); a
    candidate scorer (ARGS, a scalar value model, Transfer Q*) scores only the policy's top-k tokens and
    gives -inf elsewhere, which restricts the draw to them."""

    def next_scores(self, policy_logits: torch.Tensor) -> torch.Tensor: ...

    def advance(self, tokens: torch.Tensor, advance: torch.Tensor | None = None) -> None: ...

    def select(self, index: torch.Tensor) -> None: ...


@dataclass
class GuideContext:
    """What a guide gets when a batch starts.

    batch: the rows being decoded (each prompt repeated num_return_sequences times).
    width: the vocabulary width shared by the policy and every guide; scores are [rows, width].
    settings: the call's generation settings (token budget, temperature, stop ids, ...).
    seeds: [rows] per-row seeds, for guides that draw (sampled rollouts).
    tokenizer: the policy's tokenizer, for guides that read text.
    policy_session: the policy's session over the same rows (its cache holds every row's prefix).
    """

    batch: PromptBatch
    width: int
    settings: GenerationSettings | None = None
    seeds: torch.Tensor | None = None
    tokenizer: Any = None
    policy_session: ModelSession | None = None

    def row_seeds(self) -> torch.Tensor:
        return torch.zeros(self.batch.size, dtype=torch.long) if self.seeds is None else self.seeds


class Guide(ABC):
    """A token-level guide (see the module docstring).

    Example, a guide that adds a fixed bonus to a few token ids (a crude keyword steer):

        >>> class TokenBonus(Guide):
        ...     def __init__(self, ids, bonus=1.0):
        ...         self.ids, self.bonus, self.name = list(ids), float(bonus), "token_bonus"
        ...     def width_for(self, policy_model, policy_tokenizer):
        ...         return len(policy_tokenizer)
        ...     def start(self, context):
        ...         scores = torch.zeros(context.batch.size, context.width)
        ...         scores[:, self.ids] = self.bonus
        ...         return StaticScores(scores)
    """

    name: str = "guide"

    @abstractmethod
    def width_for(self, policy_model, policy_tokenizer) -> int:
        """The vocabulary width this guide shares with the policy; a ValueError naming both sides when
        their tokenizers do not match."""

    @abstractmethod
    def start(self, context: GuideContext) -> GuideState:
        """The guide's state for a new batch of rows."""


class StaticScores:
    """A GuideState whose scores do not depend on the prefix (fixed per row)."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def next_scores(self, policy_logits: torch.Tensor) -> torch.Tensor:
        return self.scores.to(policy_logits.device)

    def advance(self, tokens: torch.Tensor, advance: torch.Tensor | None = None) -> None:
        pass

    def select(self, index: torch.Tensor) -> None:
        self.scores = self.scores[index.to(self.scores.device)]


def as_guides(guides, what: str) -> list[Guide]:
    """A guide or a sequence of guides as a non-empty list, each checked to be a Guide."""
    out = list(guides) if isinstance(guides, Sequence) and not isinstance(guides, str) else [guides]
    if not out:
        raise ValueError(f"{what}: at least one guide is needed")
    for g in out:
        if not isinstance(g, Guide):
            raise TypeError(f"{what} must be Guide objects (ARM, PromptedARM, QValueModel, ScalarValueModel, "
                            f"PrefixRewardGuide, or a Guide subclass), got {type(g).__name__}")
    return out
