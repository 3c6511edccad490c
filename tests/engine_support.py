"""A reference sampling engine for the engine tests: prefixes decoded from scratch by this package's own
loop, so routing a method's sampling through an engine can be checked against the in-process path."""

from __future__ import annotations

import torch

from align_decode.decoding import Policy, PromptBatch, decode, left_pad
from align_decode.decoding.engine import as_budgets, as_seeds
from align_decode.decoding.vocab import output_width
from align_decode.serving.engines import Completion, EngineOutput, SamplingEngine


class LoopEngine(SamplingEngine):
    """A reference engine: the prefixes left-padded and decoded from scratch by this package's loop, prefix
    i seeded by seeds[i] (draw j of n by seeds[i] + j)."""

    name = "loop"

    def __init__(self, model):
        self.model = model
        self.calls = 0

    @property
    def vocab_size(self) -> int:
        return output_width(self.model)

    def generate(self, prefixes, max_tokens, settings, seeds, n=1):
        self.calls += 1
        budgets = as_budgets(max_tokens, len(prefixes))
        seeds = as_seeds(seeds, len(prefixes))
        rows = [(list(p), m, s + j) for p, m, s in zip(prefixes, budgets, seeds) for j in range(n)]
        batch = PromptBatch(*left_pad([p for p, _, _ in rows], settings.pad_id))
        session, logits = Policy(self.model).start(batch)
        out = decode(session, logits, sampling=settings.sampling_rows(torch.tensor([s for _, _, s in rows])),
                     max_new_tokens=torch.tensor([m for _, m, _ in rows]), stop_ids=settings.stop_ids,
                     pad_id=settings.pad_id)
        done = []
        for i, (_, _, seed) in enumerate(rows):
            length = int(out.lengths[i])
            done.append(Completion(out.tokens[i, :length].tolist(), bool(out.stopped[i]),
                                   out.logprobs[i, :length].tolist(), seed))
        return EngineOutput([done[i * n:(i + 1) * n] for i in range(len(prefixes))], session.forward_tokens)
