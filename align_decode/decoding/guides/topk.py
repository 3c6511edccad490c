"""Guides that score only the policy's top-k next tokens.

ARGS, controlled decoding with a scalar value model and Transfer Q* all score a few candidate tokens
per step (a reward or value of prefix + v, or rollouts from it) instead of the whole vocabulary. Such a
guide returns its values at the policy's k most likely tokens and -inf everywhere else, so the mix

    z = log p(v) / T + w * score(v)        (score(v) = -inf outside the top-k)

draws only among the candidates, from softmax(log p / T + w * score) restricted to them. The candidate
set is taken from the policy's logits at each step; a weight of 0 ignores the guide altogether (no
restriction), which gives back the base policy.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from ..prompts import PromptBatch
from ...validation import AT_LEAST_ONE
from .base import Guide, GuideContext


class TopKGuideState:
    """Running state of a top-k guide: each row's prompt and generated tokens, in step with the policy."""

    def __init__(self, guide: "TopKGuide", batch: PromptBatch, tokenizer=None):
        self.guide = guide
        self.tokenizer = tokenizer  # the one that reads the rows' text, when the guide reads text
        self.prompts = [p.tolist() for p in batch.token_lists()]
        self.texts = batch.texts
        self.generated: list[list[int]] = [[] for _ in self.prompts]
        self.last_candidates: torch.Tensor | None = None  # [B, k] token ids scored at the last step
        self.last_values: torch.Tensor | None = None  # [B, k] their scores

    def prefixes(self) -> list[list[int]]:
        """Each row's prompt and response so far (token ids)."""
        return [p + g for p, g in zip(self.prompts, self.generated)]

    def next_scores(self, policy_logits: torch.Tensor) -> torch.Tensor:
        k = min(self.guide.k, policy_logits.shape[-1])
        top = policy_logits.topk(k, dim=-1).indices
        values = torch.as_tensor(self.guide.score_candidates(self, top), dtype=torch.float32, device=policy_logits.device)
        if values.shape != top.shape:
            raise ValueError(f"{self.guide.name} scored {tuple(values.shape)} values for {tuple(top.shape)} candidates")
        if bool(torch.isnan(values).any()) or bool(torch.isinf(values).any()):
            raise ValueError(f"{self.guide.name} produced non-finite candidate scores")
        self.last_candidates, self.last_values = top, values
        out = torch.full_like(policy_logits, float("-inf"), dtype=torch.float32)
        return out.scatter_(-1, top, values)

    def advance(self, tokens: torch.Tensor, advance: torch.Tensor | None = None) -> None:
        for b, tok in enumerate(tokens.tolist()):
            if advance is None or bool(advance[b]):
                self.generated[b].append(tok)
        self.guide.after_advance(self, tokens, advance)

    def select(self, index: torch.Tensor) -> None:
        idx = index.tolist()
        self.prompts = [self.prompts[i] for i in idx]
        self.generated = [list(self.generated[i]) for i in idx]
        if self.texts is not None:
            self.texts = [self.texts[i] for i in idx]
        self.guide.after_select(self, index)


class TopKGuide(Guide):
    """Base class: score the policy's top-k candidate tokens of every row each step.

    Subclasses implement `score_candidates(state, candidates [B, k]) -> [B, k]` and may keep extra
    per-row state (a KV cache of another model) by overriding `start`, `after_advance`, `after_select`.
    """

    name = "topk_guide"

    def __init__(self, k: int = 10):
        self.k = AT_LEAST_ONE.check(k, "k (the number of candidate tokens)")

    def width_for(self, policy_model, policy_tokenizer) -> int:
        from ..vocab import output_width

        width = output_width(policy_model)
        if policy_tokenizer is not None:
            width = min(width, len(policy_tokenizer))
        if self.k > width:
            raise ValueError(f"k={self.k} is larger than the vocabulary ({width} tokens)")
        return width

    def start(self, context: GuideContext) -> TopKGuideState:
        return TopKGuideState(self, context.batch, context.tokenizer)

    @abstractmethod
    def score_candidates(self, state: TopKGuideState, candidates: torch.Tensor) -> torch.Tensor:
        """Scores [B, k] of appending each candidate token to each row's prefix."""

    def after_advance(self, state: TopKGuideState, tokens: torch.Tensor, advance: torch.Tensor | None) -> None:
        """Hook: the rows took these tokens."""

    def after_select(self, state: TopKGuideState, index: torch.Tensor) -> None:
        """Hook: rows were dropped, reordered or forked."""
