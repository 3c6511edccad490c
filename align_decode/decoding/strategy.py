"""What a decoding strategy is, and the token-level family that runs the loop with guides.

A strategy turns a batch of prompts and settings into generated rows (num_return_sequences per prompt,
prompt-major, as `model.generate()` lays them out). Token-level strategies (plain sampling, GenARM,
tokenwise controlled decoding) only say which guides to mix in and with which weights; the loop does
the rest. Sequence-level strategies (best-of-N, blockwise CD, Transfer Q*, QAlign, the step-level
searches of `step_search`) call the loop themselves on prepared sessions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .guides.base import Guide, GuideContext
from .joint import fuse_same_model
from .loop import Decoded, decode
from .prompts import PromptBatch
from .session import ModelSession
from .settings import GenerationSettings, validate_ids
from .vocab import output_width


@dataclass
class Policy:
    """The frozen model being steered, with its tokenizer."""

    model: Any
    tokenizer: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def width(self, guides: Sequence[Any] = ()) -> int:
        """Logits width to decode over: the model's own, or the common width shared with the guides."""
        widths = [g.width_for(self.model, self.tokenizer) for g in guides]
        return min(widths) if widths else output_width(self.model)

    def start(self, batch: PromptBatch, width: int | None = None, repeats: int = 1) -> tuple[ModelSession, torch.Tensor]:
        """Prefill the prompts once, then fork each into `repeats` rows."""
        session = ModelSession(self.model, vocab_size=width)
        logits = session.prefill(batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
        if repeats > 1:
            index = torch.arange(batch.size, device=self.device).repeat_interleave(repeats)
            session.select(index)
            logits = logits[index]
        return session, logits


class Strategy(ABC):
    """Base class of every decoding method. Subclasses validate their arguments in __init__."""

    name: str = "strategy"
    # Whether run() feeds settings.streamer token by token; otherwise the final rows are streamed at the end.
    streams: bool = False
    # Whether run() can return per-step scores (the full law of each drawn token).
    gives_scores: bool = False

    @abstractmethod
    def run(self, policy: Policy, batch: PromptBatch, settings: GenerationSettings) -> Decoded:
        """Generate settings.num_return_sequences rows per prompt."""

    def hyperparameters(self) -> dict:
        """The method's settings, for logs and output files."""
        return {}


class TokenStrategy(Strategy):
    """A strategy that mixes token-level guides into the policy every step."""

    streams = True
    gives_scores = True

    def guides(self) -> Sequence[Guide]:
        return ()

    def mixing(self, settings: GenerationSettings) -> tuple[float, list[float]]:
        """(policy temperature, one weight per guide) for these settings."""
        return settings.temperature, []

    def adjust(self, settings: GenerationSettings) -> GenerationSettings:
        """Hook: the settings this method decodes with (ARGS restricts the draw to its candidates)."""
        return settings

    def decoder(self, policy: Policy) -> Policy:
        """Hook: the model whose scores are the prior term (the policy; Transfer Q* may use its baseline)."""
        return policy

    def finish(self, out: Decoded, session, states: list) -> Decoded:
        """Hook: add what the method accounts for (rollouts, reward calls) to the loop's output."""
        return out

    def run(self, policy: Policy, batch: PromptBatch, settings: GenerationSettings) -> Decoded:
        guides = list(self.guides())
        settings = self.adjust(settings)
        n = settings.num_return_sequences
        # Vocabularies are checked for every guide, even one weighted 0 in this call.
        width = policy.width(guides)
        validate_ids(settings.stop_ids, width, "eos_token_id")
        validate_ids([settings.pad_id], width, "pad_token_id")
        temperature, weights = self.mixing(settings)
        # A guide weighted 0 adds nothing to the mix: skip its forward passes altogether.
        kept = [i for i, w in enumerate(weights) if w != 0]
        guides, weights = [guides[i] for i in kept], [weights[i] for i in kept]
        decoder = self.decoder(policy)
        rows_batch = batch.repeat_interleave(n)
        session, logits = decoder.start(batch, width, repeats=n)
        device = logits.device
        seeds = settings.row_seeds(batch.size, n, device)
        context = GuideContext(rows_batch, width, settings, seeds, policy.tokenizer or decoder.tokenizer, session)
        states = [g.start(context) for g in guides]
        # A guide that is the policy's own model (a prompted ARM) shares the policy's forward passes.
        session, states = fuse_same_model(session, states)
        w = torch.tensor(weights, dtype=torch.float32, device=device).expand(rows_batch.size, len(guides))
        out = decode(
            session,
            logits,
            states,
            w if guides else None,
            sampling=settings.sampling_rows(seeds, temperature),
            max_new_tokens=settings.max_new_tokens,
            stop_ids=settings.stop_ids,
            pad_id=settings.pad_id,
            output_scores=settings.output_scores,
            streamer=settings.streamer,
            progress=settings.progress,
        )
        return self.finish(out, session, states)


class Sample(TokenStrategy):
    """Plain decoding from the policy (greedy or sampled): the baseline every method is compared with."""

    name = "sample"
