"""Model runner V1 (what vLLM runs on CPU): follow the persistent batch through `BatchUpdate`s.

V1 rows are persistent-batch indices. Each step vLLM reports, in this order, the indices removed, the
requests added (index, params, prompt ids, a live reference to the output ids list) and the moves
(one-way, or swaps). A request's logits row is its index, and its token history is its prompt plus the
live output list, read on the host: feeding the guide one token per step costs no device read.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

from ...decoding.prompts import left_pad
from .batch import GuidedBatch, GuidedRequest, apply_moves, upload
from .config import RequestGuidance

logger = logging.getLogger(__name__)

# vLLM's placeholder for a token sampled but not yet copied to the host (async scheduling).
_PLACEHOLDER = -1


class ListTokens:
    """TokenSource over V1's host lists: handle = (prompt ids, live output ids)."""

    @staticmethod
    def _token(handle, i: int) -> int:
        prompt, output = handle
        tok = prompt[i] if i < len(prompt) else output[i - len(prompt)]
        if tok == _PLACEHOLDER:
            raise RuntimeError(
                "align-decode guidance read a placeholder token id (-1): the engine runs with async "
                "scheduling and does not pass sampled ids to entry-point processors; start vLLM with "
                "--no-async-scheduling (or use model runner V2)"
            )
        return tok

    def prefix(self, reqs: Sequence[GuidedRequest], lengths: Sequence[int], device: torch.device):
        seqs = []
        for r, n in zip(reqs, lengths):
            prompt, output = r.handle
            seq = list(prompt[:n]) + list(output[: max(0, n - len(prompt))])
            if _PLACEHOLDER in seq:
                self._token((seq, ()), seq.index(_PLACEHOLDER))  # raises the explanation
            seqs.append(seq)
        ids, mask = left_pad(seqs, 0)
        if device.type == "cpu":
            return ids, mask
        return ids.pin_memory().to(device, non_blocking=True), mask.pin_memory().to(device, non_blocking=True)

    def last(self, reqs: Sequence[GuidedRequest], lengths: Sequence[int], device: torch.device) -> torch.Tensor:
        return upload([self._token(r.handle, n - 1) for r, n in zip(reqs, lengths)], device)


class V1Guidance:
    """The V1 side of the processor: index -> guided request, kept in step with vLLM's batch updates.

    Args:
        batch: the guide caches.
        parse: SamplingParams -> RequestGuidance | None (the processor's request parser).
        scale: SamplingParams -> c (temperature, or 1 for greedy).
    """

    def __init__(self, batch: GuidedBatch, parse: Callable, scale: Callable):
        self.batch = batch
        self.parse = parse
        self.scale = scale
        self.by_index: dict[int, GuidedRequest] = {}
        self.source = ListTokens()
        self._warned_embeds = False

    def _drop(self, index: int) -> None:
        req = self.by_index.pop(index, None)
        if req is not None:
            self.batch.remove(req)

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            # An added request may take the index of one removed this step or moved away.
            self._drop(index)
            guidance: RequestGuidance | None = self.parse(params)
            if not guidance:
                continue
            if prompt_ids is None:
                if not self._warned_embeds:
                    logger.warning("align-decode guidance needs prompt token ids; a request given as prompt "
                                   "embeddings is decoded without its guides")
                    self._warned_embeds = True
                continue
            self.by_index[index] = self.batch.add(guidance, self.scale(params), handle=(prompt_ids, output_ids))
        apply_moves(self.by_index, batch_update.moved, self._drop)
        if not self.by_index:
            self.batch.flush()  # the last guided request left: free its guide caches without waiting

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.by_index:
            return logits  # no guided request in this batch: nothing to do, nothing read
        reqs, lengths = [], []
        for index, req in self.by_index.items():
            req.row = index
            prompt, output = req.handle
            reqs.append(req)
            lengths.append(len(prompt) + len(output))
        self.batch.sync(reqs, lengths, self.source)
        return self.batch.mix(logits)
