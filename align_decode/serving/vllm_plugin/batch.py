"""Guide KV caches for the guided requests of a serving batch, and the mixing of their scores.

Engine-independent: the vLLM adapters (model runner V1 and V2) say which requests are guided, where
each request's logits row is this step and how long its token history is, and hand over a
`TokenSource` that reads the tokens; this module keeps the guides in step and adds their scores.

Per guide there is one `ModelSession` whose rows are the requests that use that guide, so every guide
runs one batched forward per step whatever the number of requests. A request's guides are advanced
incrementally from its token count:

    need = length - fed    1: feed the newest token (the usual decode step)
                           0: nothing new (a later chunk of a chunked prefill): keep the scores
                 > 1, < 0, or fed = 0: (re)build the row from the whole prefix in one batched prefill
                           (new, resumed after preemption, or out of step for any reason)

so the state is always a function of the request's tokens: a rebuilt row equals an advanced one.

Mixing (GenARM, section 4 of the algorithms spec; a Q-head is mixed the same way with weight lambda):
the sampled law is  log_softmax( s / T + sum_i a_i g_i )  with policy logits s, guide scores g_i and
weights a_i. vLLM applies custom processors before dividing by the temperature, so this adds

    s  <-  s + c * sum_i a_i g_i,        c = T for a sampled request, 1 for a greedy one,

and vLLM's division by T then gives the law above (greedy takes the argmax of s + sum_i a_i g_i, which
no positive temperature changes). A guide's per-row constant (e.g. an ARM's log-normaliser) cancels,
so raw guide logits are used. Columns past the width a guide shares with the policy tokenizer are set
to -inf for guided rows, as the Hugging Face backend decodes over the shared width only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import torch

from ...decoding.session import ModelSession
from .bank import GuideBank, LoadedGuide
from .config import RequestGuidance


@dataclass(eq=False)
class GuidedRequest:
    """One guided request as the guides see it.

    Attributes:
        guidance: the guides and weights it asked for.
        scale: c above: the request's temperature, or 1 when it decodes greedily.
        handle: the adapter's way to find the request's tokens (V1: its id lists; V2: its slot).
        row: the request's logits row in the current step (set by the adapter before mixing).
        fed: tokens its guides have consumed; 0 = not built yet.
    """

    guidance: RequestGuidance
    scale: float
    handle: Any = None
    row: int = -1
    fed: int = 0
    _weights: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._weights = {name: w * self.scale for name, w in self.guidance.weights}


def upload(values, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A host list as a tensor on `device`. To an accelerator it goes through pinned memory and an
    asynchronous copy: a copy from pageable memory would wait for the device's queued work every step."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class TokenSource(Protocol):
    """Reads the token history of requests (the adapters implement this)."""

    def prefix(self, reqs: Sequence[GuidedRequest], lengths: Sequence[int], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's first lengths[i] tokens, left padded: ids [n, L] and attention mask [n, L]."""

    def last(self, reqs: Sequence[GuidedRequest], lengths: Sequence[int], device: torch.device) -> torch.Tensor:
        """The token at position lengths[i] - 1 of each request: [n] long."""


class _GuideRows:
    """One guide's running state: a session whose row i belongs to requests[i], and its latest scores."""

    def __init__(self, guide: LoadedGuide):
        self.guide = guide
        self.session: ModelSession | None = None
        self.requests: list[GuidedRequest] = []
        self.scores: torch.Tensor | None = None  # [n, width] on the guide's device
        self._weights: torch.Tensor | None = None  # [n] a_i * c per row, rebuilt when rows change

    def drop(self, gone: set[int]) -> None:
        """Remove the rows of requests whose id() is in `gone` (one gather for all of them)."""
        keep = [i for i, r in enumerate(self.requests) if id(r) not in gone]
        if len(keep) == len(self.requests):
            return
        self._weights = None
        if not keep:
            self.session, self.scores, self.requests = None, None, []
            return
        index = upload(keep, self.guide.device)
        self.session.select(index)
        self.session.maybe_compact()  # columns of departed rows would otherwise pile up
        self.scores = self.scores[index]
        self.requests = [self.requests[i] for i in keep]

    def step(self, tokens: dict[int, int], last: torch.Tensor) -> None:
        """Feed each row whose request id() is in `tokens` the token last[tokens[id]]; others hold."""
        if self.session is None:
            return
        pos = [tokens.get(id(r), -1) for r in self.requests]
        if all(p < 0 for p in pos):
            return
        dev = self.guide.device
        idx = upload(pos, dev)
        advance = None if min(pos) >= 0 else idx >= 0
        new = self.session.step(last.to(dev)[idx.clamp(min=0)], advance)
        self.scores = new if advance is None else torch.where(advance.unsqueeze(-1), new, self.scores)

    def append(self, reqs: list[GuidedRequest], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Prefill new rows and put them after the existing ones."""
        fresh = self.guide.new_session()
        scores = fresh.prefill(ids, mask)
        if self.session is None:
            self.session, self.scores = fresh, scores
        else:
            self.session = ModelSession.concat([self.session, fresh])
            self.scores = torch.cat([self.scores, scores])
        self.requests.extend(reqs)
        self._weights = None

    def weights(self, device: torch.device) -> torch.Tensor:
        if self._weights is None or self._weights.device != device:
            w = [r._weights[self.guide.name] for r in self.requests]
            self._weights = upload(w, device, torch.float32)
        return self._weights


class GuidedBatch:
    """The guided requests of one processor and their guides' caches.

    Example (what an adapter does each step):
        >>> req = batch.add(guidance, scale=params.temperature or 1.0, handle=...)
        >>> batch.sync(live_requests, lengths, source)      # advance / build the guide rows
        >>> logits = batch.mix(logits)                      # rows from req.row
    """

    def __init__(self, bank: GuideBank):
        self.bank = bank
        self.rows = {name: _GuideRows(guide) for name, guide in bank.guides.items()}
        self.requests: set[GuidedRequest] = set()
        self._gone: set[int] = set()
        self._inf: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def _neg_inf(self, device: torch.device) -> torch.Tensor:
        if self._inf is None or self._inf.device != device:
            self._inf = torch.tensor(float("-inf"), device=device)
        return self._inf

    def add(self, guidance: RequestGuidance, scale: float, handle: Any = None) -> GuidedRequest:
        if not guidance:
            raise ValueError("add() takes a request with at least one nonzero guide weight")
        missing = [name for name, _ in guidance.weights if name not in self.bank]
        if missing:
            raise KeyError(f"guide(s) {missing} are not loaded")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        req = GuidedRequest(guidance, float(scale), handle)
        self.requests.add(req)
        return req

    def remove(self, req: GuidedRequest) -> None:
        """Forget a request; its rows leave the guide caches at the next sync."""
        if req in self.requests:
            self.release(req)
            self.requests.discard(req)

    def release(self, req: GuidedRequest) -> None:
        """Free a request's guide rows but keep it: it is rebuilt from its tokens when it is next synced
        (for a request the engine has not scheduled for a while)."""
        if req.fed:
            self._gone.add(id(req))
            req.fed = 0

    def flush(self) -> None:
        """Free the rows of removed requests now (sync does it too; this is for when no step follows)."""
        if self._gone:
            for rows in self.rows.values():
                rows.drop(self._gone)
            self._gone = set()

    @torch.no_grad()
    def sync(self, reqs: Sequence[GuidedRequest], lengths: Sequence[int], source: TokenSource) -> None:
        """Bring the guides of each request in `reqs` to its first lengths[i] tokens.

        Requests not listed keep their state (they are not in this step)."""
        build: list[tuple[GuidedRequest, int]] = []
        stepped: list[tuple[GuidedRequest, int]] = []
        for r, n in zip(reqs, lengths):
            need = n - r.fed
            if r.fed == 0 or need > 1 or need < 0:
                # need < 0: the engine dropped tokens the guides had read (e.g. after a KV-load failure).
                build.append((r, n))
            elif need == 1:
                stepped.append((r, n))
            # need == 0: no new token (a later chunk of a chunked prefill): the scores stand, and the
            # engine discards this row's logits anyway.
        gone = self._gone | {id(r) for r, _ in build if r.fed}
        self._gone = set()
        if stepped:
            # One device read for all stepped requests; each guide picks its rows from it.
            last = source.last([r for r, _ in stepped], [n for _, n in stepped], self._token_device())
            position = {id(r): i for i, (r, _) in enumerate(stepped)}
        for rows in self.rows.values():
            if gone:
                rows.drop(gone)
            if stepped:
                rows.step(position, last)
        if build:
            self._build(build, source)
        for r, n in stepped:
            r.fed = n
        for r, n in build:
            r.fed = n

    def _token_device(self) -> torch.device:
        devices = {g.device for g in self.bank.guides.values()}
        return devices.pop() if len(devices) == 1 else torch.device("cpu")

    def _build(self, build: list[tuple[GuidedRequest, int]], source: TokenSource) -> None:
        # Read each prefix once, then give every guide the rows of the requests that use it.
        reqs, lengths = [r for r, _ in build], [n for _, n in build]
        ids, mask = source.prefix(reqs, lengths, self._token_device())
        for name, rows in self.rows.items():
            mine = [i for i, r in enumerate(reqs) if name in r._weights]
            if not mine:
                continue
            dev = rows.guide.device
            sel = upload(mine, ids.device)
            sub_ids, sub_mask = ids[sel].to(dev), mask[sel].to(dev)
            # Trim the shared left padding of this subset (shorter prompts need fewer columns).
            width = max(lengths[i] for i in mine)
            rows.append([reqs[i] for i in mine], sub_ids[:, -width:], sub_mask[:, -width:])

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """Add each guided request's weighted guide scores to its logits row req.row (in place).
        Requests with row < 0 are not in this step and are left out."""
        if not self.requests:
            return logits
        device, width = logits.device, logits.shape[1]
        for rows in self.rows.values():
            if rows.session is None:
                continue
            at = [r.row for r in rows.requests]
            scores, weights = rows.scores, rows.weights(device)
            if min(at) < 0:
                keep = [i for i, row in enumerate(at) if row >= 0]
                if not keep:
                    continue
                at = [at[i] for i in keep]
                scores, weights = scores[upload(keep, scores.device)], weights[upload(keep, device)]
            index = upload(at, device)
            w = min(rows.guide.width, width)
            scores = scores[:, :w].to(device, non_blocking=True)
            target = logits if w == width else logits[:, :w]
            # index_put_ rather than index_add_: the latter takes milliseconds on a CPU even for a
            # few rows (measured: 4-13 ms for 8 x 64), the former microseconds.
            target.index_put_((index,), scores * weights.unsqueeze(-1), accumulate=True)
            if w < width:
                # Tokens the guide cannot score (padding rows of the policy head) are out of the law.
                logits[:, w:].index_put_((index,), self._neg_inf(device))
        return logits


def apply_moves(by_index: dict, moved, drop) -> None:
    """Follow vLLM's row moves in a {batch row: request state} map: a SWAP exchanges two rows' states; a
    one-way move puts a's state at b, and `drop(b)` first releases whatever b held."""
    for a, b, direction in moved:
        if direction.name == "SWAP":
            ra, rb = by_index.pop(a, None), by_index.pop(b, None)
            if ra is not None:
                by_index[b] = ra
            if rb is not None:
                by_index[a] = rb
        else:
            ra = by_index.pop(a, None)
            drop(b)
            if ra is not None:
                by_index[b] = ra

