"""The logits processor's side of the composite path (model runner V1): which rows are guided, with
which weights, and the mixing of the scores the composite model handed over this step.

No guide runs here and no token is read: the guides ran inside vLLM's forward. A request's state is
its weights (c * w_i per packed guide, c = temperature or 1 for greedy), kept at its batch index
through vLLM's `BatchUpdate`s (removed, added, moved: in that order).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..vllm_plugin.batch import apply_moves
from . import handoff
from .spec import CompositeSpec


class CompositeV1Guidance:
    """Args:
        spec: the composite model's guides (their order is the order of the scores handed over).
        parse: SamplingParams -> RequestGuidance | None, restricted to the packed guides.
        scale: SamplingParams -> c.
    """

    def __init__(self, spec: CompositeSpec, parse: Callable, scale: Callable):
        self.spec = spec
        self.index = {g.name: i for i, g in enumerate(spec.guides)}
        self.widths = [g.width for g in spec.guides]
        self.parse = parse
        self.scale = scale
        self.by_index: dict[int, list[float]] = {}
        self._cache: tuple | None = None  # (rows, weights [G, n]) rebuilt when the batch changes

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        changed = False
        for index in batch_update.removed:
            changed |= self.by_index.pop(index, None) is not None
        for index, params, _prompt, _output in batch_update.added:
            changed |= self.by_index.pop(index, None) is not None
            guidance = self.parse(params)
            if not guidance:
                continue
            c = self.scale(params)
            w = [0.0] * len(self.index)
            for name, weight in guidance.weights:
                w[self.index[name]] += c * weight
            self.by_index[index] = w
            changed = True
        if batch_update.moved:
            apply_moves(self.by_index, batch_update.moved, lambda row: self.by_index.pop(row, None))
            changed = True
        if changed:
            self._cache = None

    def _rows(self, device: torch.device):
        if self._cache is None or self._cache[0].device != device:
            rows = sorted(self.by_index)
            weights = torch.tensor([self.by_index[r] for r in rows], dtype=torch.float32).T.contiguous()
            self._cache = (torch.tensor(rows, dtype=torch.long).to(device), weights.to(device),
                           [bool(weights[g].any()) for g in range(weights.shape[0])], max(rows) if rows else -1)
        return self._cache

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.by_index:
            return logits  # nothing guided this step: the published scores are simply not read
        scores = handoff.take(logits.shape[0])
        rows, weights, used, top = self._rows(logits.device)
        if top >= logits.shape[0]:
            raise RuntimeError(f"align-decode: guided row {top} is outside the {logits.shape[0]}-row batch")
        width = logits.shape[1]
        add = None
        narrow = width
        for g, s in enumerate(scores):
            if not used[g]:
                continue
            w = min(width, s.shape[1], self.widths[g] or width)
            narrow = min(narrow, w)
            part = s.index_select(0, rows)[:, :w].to(torch.float32) * weights[g].unsqueeze(-1)
            if add is None:
                add = torch.zeros(rows.shape[0], width, dtype=torch.float32, device=logits.device)
            add[:, :w] += part
        if add is None:
            return logits
        logits.index_put_((rows,), add.to(logits.dtype), accumulate=True)
        if narrow < width:
            # Tokens a guide cannot score (padding rows of the policy head) are out of the law.
            logits[:, narrow:].index_put_((rows,), torch.tensor(float("-inf"), device=logits.device))
        return logits
