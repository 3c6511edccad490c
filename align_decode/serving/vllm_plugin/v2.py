"""Model runner V2 (vLLM's default on GPU): per-slot requests, token history on the device.

V2 keys requests by a persistent slot (recycled through a free list: `add_request` must reset a slot)
and never says when a request leaves. Each step's `LogitsContext` maps batch positions to slots
(`idx_mapping_np`, on the host) and gives each position's sequence length (`seq_lens_upper_bound_np`,
exact without speculative decoding, which the processor refuses). Tokens live in
`req_states.all_token_ids` [slots, max_len] on the device; they are gathered there, so advancing the
guides reads no token back to the host.

A guided slot that is missing from the batch for `evict_after` consecutive guided steps has its guide
rows freed (its request finished, or is waiting); if it comes back it is rebuilt from its tokens.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .batch import GuidedBatch, GuidedRequest, upload


class SlotTokens:
    """TokenSource over V2's device token table: handle = slot index."""

    def __init__(self, req_states):
        self.req_states = req_states

    def _table(self) -> torch.Tensor:
        return self.req_states.all_token_ids.gpu

    def prefix(self, reqs: Sequence[GuidedRequest], lengths: Sequence[int], device: torch.device):
        table = self._table()
        width = max(lengths)
        # Index arrays built on the host (the lengths are host numbers), gathered on the device.
        n = np.asarray(lengths, dtype=np.int64)[:, None]
        cols = np.arange(width, dtype=np.int64)[None, :] - (width - n)  # left padding: newest token last
        mask = upload((cols >= 0).astype(np.int64), table.device)
        slots = np.broadcast_to(np.asarray([r.handle for r in reqs], dtype=np.int64)[:, None], cols.shape)
        ids = table[upload(slots, table.device), upload(np.maximum(cols, 0), table.device)].long() * mask
        return ids.to(device), mask.to(device)

    def last(self, reqs: Sequence[GuidedRequest], lengths: Sequence[int], device: torch.device) -> torch.Tensor:
        table = self._table()
        slots = upload([r.handle for r in reqs], table.device)
        cols = upload([n - 1 for n in lengths], table.device)
        return table[slots, cols].long().to(device)


class V2Guidance:
    """The V2 side of the processor: slot -> guided request.

    Args:
        batch: the guide caches.
        req_states: vLLM's LogitsProcRequestState (read only).
        parse: SamplingParams -> RequestGuidance | None.
        scale: SamplingParams -> c (temperature, or 1 for greedy).
        evict_after: guided steps a slot may be absent before its guide rows are freed.
    """

    def __init__(self, batch: GuidedBatch, req_states, parse: Callable, scale: Callable, evict_after: int = 4):
        if evict_after < 1:
            raise ValueError(f"evict_after must be >= 1, got {evict_after}")
        self.batch = batch
        self.req_states = req_states
        self.parse = parse
        self.scale = scale
        self.evict_after = evict_after
        self.by_slot: dict[int, GuidedRequest] = {}
        self.guided = np.zeros(req_states.max_num_reqs, dtype=bool)  # host mask: cheap early return
        self.last_seen: dict[int, int] = {}
        self.steps = 0
        self.source = SlotTokens(req_states)

    def add_request(self, slot: int, params) -> bool:
        old = self.by_slot.pop(slot, None)
        if old is not None:  # the slot's previous occupant is gone
            self.batch.remove(old)
            self.last_seen.pop(slot, None)
        self.guided[slot] = False
        guidance = self.parse(params)
        if not guidance:
            if not self.by_slot:
                self.batch.flush()  # no guided request left: free the guide caches now
            return False
        self.by_slot[slot] = self.batch.add(guidance, self.scale(params), handle=slot)
        self.guided[slot] = True
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        slots = ctx.idx_mapping_np
        present = self.guided[slots]
        if not present.any():
            return logits
        if logits.shape[0] != len(slots):
            raise RuntimeError(
                f"align-decode guidance expects one logits row per request, got {logits.shape[0]} rows for "
                f"{len(slots)} requests (speculative decoding is not supported)"
            )
        self.steps += 1
        prefill_len = self.req_states.prefill_len.np
        for req in self.by_slot.values():
            req.row = -1  # not in this step unless listed below
        reqs, lengths = [], []
        for pos in np.flatnonzero(present).tolist():
            slot = int(slots[pos])
            req = self.by_slot[slot]
            req.row = pos
            reqs.append(req)
            # During a chunked prefill the row's logits are discarded; building the guide on the whole
            # prefill at once (prefill_len) avoids rebuilding it chunk by chunk.
            lengths.append(max(int(ctx.seq_lens_upper_bound_np[pos]), int(prefill_len[slot])))
            self.last_seen[slot] = self.steps
        for slot, seen in list(self.last_seen.items()):
            if self.steps - seen > self.evict_after:
                self.batch.release(self.by_slot[slot])
                del self.last_seen[slot]
        self.batch.sync(reqs, lengths, self.source)
        return self.batch.mix(logits)
