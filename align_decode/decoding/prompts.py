"""A batch of prompts as the decoders see it: left-padded token ids, plus the prompt text for rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def left_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into [B, L] ids and attention mask, padding on the left."""
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in rows]
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r) :] = r
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [B, P], left padded
    attention_mask: torch.Tensor  # [B, P], 0 on padding
    texts: list[str] | None = None  # the prompts as text (what sequence rewards read)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def token_lists(self) -> list[torch.Tensor]:
        return [self.input_ids[b][self.attention_mask[b].bool()] for b in range(self.size)]

    def repeat_interleave(self, n: int) -> "PromptBatch":
        """Each prompt n times in a row, as num_return_sequences lays rows out."""
        if n == 1:
            return self
        texts = None if self.texts is None else [t for t in self.texts for _ in range(n)]
        return PromptBatch(
            self.input_ids.repeat_interleave(n, dim=0), self.attention_mask.repeat_interleave(n, dim=0), texts
        )

    def select(self, index: torch.Tensor) -> "PromptBatch":
        texts = None if self.texts is None else [self.texts[i] for i in index.tolist()]
        return PromptBatch(self.input_ids[index], self.attention_mask[index], texts)

    def prompt_texts(self, tokenizer) -> list[str]:
        """The prompts as text: given texts, else the decoded ids without special tokens."""
        if self.texts is not None:
            return self.texts
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to turn prompt ids into text for a sequence reward")
        return tokenizer.batch_decode(self.token_lists(), skip_special_tokens=True)
