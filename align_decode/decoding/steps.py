"""Where a reasoning step ends: at a delimiter in the text (a blank line by default), or every M tokens.

Step-level search (beam search, DVTS, particle filtering) decodes one step of every path at a time and
scores the partial responses there. The loop decides token by token, so the delimiter is read off the
vocabulary once per tokenizer:

- a token whose text contains the delimiter ends the step it belongs to (with SmolLM2's tokenizer
  "\\n\\n" and "\\n\\n\\n" are single tokens; ".\\n\\n" is "." then "\\n\\n");
- a delimiter split over two tokens ends the step at the second one: the previous token's text ends with
  the delimiter's first k characters and the new token's text starts with the rest.

The token that completes the delimiter belongs to the step it ends (with any text it carries after it).
A delimiter split over three tokens or more is not seen; "every M tokens" (`step_tokens`) bounds a step
whatever the text.

    >>> boundary = StepBoundary.build(tokenizer, delimiter="\\n\\n", step_tokens=64)
    >>> boundary(previous_tokens, tokens)      # [B] bool: the new token ends a step
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_VOCAB_TEXTS: dict[int, list[str]] = {}


def token_texts(tokenizer, width: int) -> list[str]:
    """The text of each of the first `width` token ids, decoded alone (cached per tokenizer)."""
    key = id(tokenizer)
    texts = _VOCAB_TEXTS.get(key)
    if texts is None or len(texts) < width:
        size = max(width, len(tokenizer))
        texts = [tokenizer.decode([i], skip_special_tokens=False) if i < len(tokenizer) else "" for i in range(size)]
        _VOCAB_TEXTS[key] = texts
    return texts[:width]


@dataclass(frozen=True)
class StepBoundary:
    """Which (previous token, token) pairs end a step. `contains[v]`: token v's text holds the delimiter;
    `splits`: (ends_with_head [V], starts_with_tail [V]) for each way of cutting the delimiter in two."""

    delimiter: str | None
    step_tokens: int | None
    contains: torch.Tensor | None = None
    splits: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    @classmethod
    def build(cls, tokenizer=None, delimiter: str | None = "\n\n", step_tokens: int | None = None,
              width: int | None = None) -> "StepBoundary":
        if delimiter is None and step_tokens is None:
            raise ValueError("a step needs a delimiter or a token count (step_tokens), or both")
        if delimiter == "":
            raise ValueError("the step delimiter must not be empty (None turns it off)")
        if step_tokens is not None and step_tokens < 1:
            raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
        if delimiter is None:
            return cls(None, step_tokens)
        if tokenizer is None:
            raise ValueError(f"finding the step delimiter {delimiter!r} in tokens needs the policy's tokenizer")
        texts = token_texts(tokenizer, width or len(tokenizer))
        contains = torch.tensor([delimiter in t for t in texts])
        splits = []
        for k in range(1, len(delimiter)):
            head, tail = delimiter[:k], delimiter[k:]
            ends = torch.tensor([t.endswith(head) and delimiter not in t for t in texts])
            starts = torch.tensor([t.startswith(tail) for t in texts])
            if bool(ends.any()) and bool(starts.any()):
                splits.append((ends, starts))
        return cls(delimiter, step_tokens, contains, tuple(splits))

    def ends_step(self, previous: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """[B] bool: tokens[b], drawn after previous[b], ends a step at the delimiter."""
        if self.contains is None:
            return torch.zeros_like(tokens, dtype=torch.bool)
        width = self.contains.shape[0]

        def holds(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return table.to(ids.device)[ids.clamp(0, width - 1)] & (ids < width)

        out = holds(self.contains, tokens)
        for ends, starts in self.splits:
            out = out | (holds(ends, previous) & holds(starts, tokens))
        return out

    __call__ = ends_step

    def limit(self, remaining: torch.Tensor) -> torch.Tensor:
        """Tokens a row may draw in this step: its remaining budget, capped at step_tokens."""
        return remaining if self.step_tokens is None else remaining.clamp(max=self.step_tokens)

    def stop_ids(self) -> list[int]:
        """The token ids that end a step on their own (an engine's extra stop ids; splits are not seen)."""
        return [] if self.contains is None else self.contains.nonzero().flatten().tolist()
