"""The one decoding loop every method runs.

Each step, in order:
  1. gather the guides' next-token scores for the live rows;
  2. `kernels.sample_next` mixes them with the policy's scores and draws one token per row
     (z = policy / T + sum_i w_i * guide_i, truncation, greedy or seeded draw);
  3. record the token and its log-prob under the law actually sampled from;
  4. rows that drew a stop id finish;
  5. the policy and every guide are fed the new tokens, so their caches stay in lockstep.

Token-level methods (GenARM, tokenwise controlled decoding) enter only as guides. Sequence-level methods
call this loop on sessions they prepared (forked prefixes, cut-back responses) instead of copying it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from ..kernels import SamplingRows, sample_next
from .guides.base import GuideState
from .session import ModelSession


@dataclass
class Decoded:
    """What one run of the loop produced, row by row (rows in the order they came in)."""

    tokens: torch.Tensor  # [B, T] generated tokens, pad after each row's end
    lengths: torch.Tensor  # [B] generated tokens per row, the stop token included
    stopped: torch.Tensor  # [B] bool: the row ended on a stop id (else it hit max_new_tokens)
    logprobs: torch.Tensor  # [B, T] log-prob of each token under the law it was drawn from (0 after the end)
    policy_logprobs: torch.Tensor | None = None  # [B, T] log-prob under the policy alone at T = 1
    scores: list[torch.Tensor] | None = None  # per step [B, V]: the full law drawn from
    steps: int = 0  # loop iterations run
    # What a method adds: a sequence method's typed report (decoding.report), else a dict of counts.
    extras: Mapping[str, Any] = field(default_factory=dict)
    # Every token the method drew in this call: returned rows, and the candidates, proposals or rollouts
    # it did not return. None: just the returned rows.
    sampled_tokens: int | None = None

    def total_sampled(self) -> int:
        return int(self.lengths.sum()) if self.sampled_tokens is None else self.sampled_tokens


def _check_finite(logprob: torch.Tensor, live: torch.Tensor, t: int) -> None:
    bad = ~torch.isfinite(logprob)
    if bool(bad.any()):
        rows = live[bad].tolist()
        if bool(torch.isnan(logprob[bad]).any()):
            raise ValueError(
                f"NaN in the next-token scores at step {t} (row(s) {rows}): the policy or a guide produced "
                "non-finite logits"
            )
        raise ValueError(f"every token is masked at step {t} (row(s) {rows}): nothing can be sampled")


def _finished_scores(count: int, vocab: int, pad_id: int, device) -> torch.Tensor:
    """After a row ends it emits pad with certainty: log-prob 0 on pad, -inf elsewhere."""
    s = torch.full((count, vocab), float("-inf"), device=device)
    s[:, pad_id] = 0.0
    return s


@torch.no_grad()
def decode(
    policy: ModelSession,
    logits: torch.Tensor,
    guides: Sequence[GuideState] = (),
    weights: torch.Tensor | None = None,
    *,
    sampling: SamplingRows,
    max_new_tokens: int | torch.Tensor,
    stop_ids: Sequence[int] | torch.Tensor = (),
    pad_id: int = 0,
    step_offset: int | torch.Tensor = 0,
    output_scores: bool = False,
    output_policy_logprobs: bool = False,
    streamer=None,
    progress=None,
    prune_finished: bool | str = True,
    step_end=None,
) -> Decoded:
    """Decode up to max_new_tokens tokens per row from prepared sessions.

    streamer: put(tokens [B]) each step and end() at the end, as transformers' streamers take them.
    progress: progress("step", t, max_new_tokens) after each step, for a progress display.
    logits: the policy's next-token logits [B, V] for the sessions' current prefixes.
    sampling: each row's sampling settings (temperature, truncation, greedy or seeded draw).
    max_new_tokens: one limit, or one per row ([B]); a row that reaches its limit ends unstopped.
    weights: [B, R], one weight per guide per row.
    step_offset: the random-stream step of each row's first token ([B] or an int).
    prune_finished: what happens to finished rows.
        True ("drop"): they leave the sessions (fastest; the sessions then hold the unfinished rows only).
        False ("keep"): they stay and stop advancing; every row is still run through each forward.
        "park" (policy only, no guides): they leave the batch but their caches are set aside and put
        back at the end, in the original order.
        With "keep" and "park", each session ends holding every row's prompt and all its tokens but the
        last one drawn, ready for the caller to continue from.
    step_end: step_end(previous tokens [B], tokens [B]) -> bool [B]: a row whose new token ends a
        reasoning step finishes there, unstopped (step-level search decodes one step at a time with it,
        `decoding.steps.StepBoundary`). The first previous token is the last one in each row's session.
    """
    mode = {True: "drop", False: "keep"}.get(prune_finished, prune_finished)
    if mode not in ("drop", "keep", "park"):
        raise ValueError(f"prune_finished must be True, False or 'park', got {prune_finished!r}")
    if mode == "park" and guides:
        raise ValueError("prune_finished='park' parks the policy's rows only; use False with guides")
    batch, vocab = logits.shape
    device = logits.device
    limit = torch.as_tensor(max_new_tokens, dtype=torch.long, device=device).expand(batch).clone()
    if bool((limit < 0).any()):
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    max_new_tokens = int(limit.max()) if batch else 0
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_token_id {pad_id} is outside the vocabulary [0, {vocab})")
    stop = torch.as_tensor(list(stop_ids) if not torch.is_tensor(stop_ids) else stop_ids, dtype=torch.long, device=device)
    offset = torch.as_tensor(step_offset, dtype=torch.long, device=device).expand(batch).clone()

    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, max_new_tokens), device=device)
    pol_logprobs = torch.zeros((batch, max_new_tokens), device=device) if output_policy_logprobs else None
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    scores: list[torch.Tensor] | None = [] if output_scores else None

    live = torch.arange(batch, device=device)  # original row of each row still in the sessions
    parked: list[tuple[torch.Tensor, ModelSession]] = []  # (original rows, their sessions) set aside
    done = limit == 0  # per session row: finished (unpruned mode keeps finished rows)
    previous = None if step_end is None else policy.tokens_at(policy.next_pos - 1)
    steps = 0
    for t in range(max_new_tokens):
        active = ~done
        if not bool(active.any()):
            break
        steps += 1
        out = sample_next(
            logits,
            [g.next_scores(logits) for g in guides],
            weights,
            sampling,
            step=offset + t,
            return_logprobs=output_scores,
        )
        _check_finite(out.logprob[active], live[active], t)
        new = torch.where(done, torch.full_like(out.tokens, pad_id), out.tokens)
        target = live[active]
        tokens[target, t] = new[active]
        logprobs[target, t] = out.logprob[active]
        lengths[target] += 1
        if pol_logprobs is not None:
            pol = torch.log_softmax(logits.float(), dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            pol_logprobs[target, t] = pol[active]
        if scores is not None:
            full = _finished_scores(batch, vocab, pad_id, device)
            full[target] = out.logprobs[active]
            scores.append(full)
        if streamer is not None:
            streamer.put(tokens[:, t].cpu())
        if progress is not None:
            progress("step", t + 1, max_new_tokens)

        ends = active & torch.isin(new, stop)
        stopped[live[ends]] = True
        done = done | ends | (lengths[live] >= limit[live])
        if step_end is not None:
            done = done | (active & step_end(previous, new))
            previous = new
        if t == max_new_tokens - 1 or bool(done.all()):
            break

        if mode != "keep" and bool(done.any()):
            keep = (~done).nonzero().flatten()
            if mode == "park":
                finished = done.nonzero().flatten()
                parked.append((live[finished], policy.fork(finished)))
            policy.select(keep)
            for g in guides:
                g.select(keep)
            sampling = sampling.select(keep)
            weights = None if weights is None else weights[keep]
            offset, live, new = offset[keep], live[keep], new[keep]
            previous = None if previous is None else previous[keep]
            done = done[keep]
        advance = None if not bool(done.any()) else ~done
        logits = policy.step(new, advance)
        for g in guides:
            g.advance(new, advance)

    if streamer is not None:
        streamer.end()
    if parked:
        order = torch.cat([live] + [rows_ for rows_, _ in parked])
        merged = ModelSession.concat([policy] + [sess for _, sess in parked])
        merged.select(torch.argsort(order))
        policy.absorb(merged)
    width = int(lengths.max()) if batch else 0
    return Decoded(
        tokens=tokens[:, :width],
        lengths=lengths,
        stopped=stopped,
        logprobs=logprobs[:, :width],
        policy_logprobs=None if pol_logprobs is None else pol_logprobs[:, :width],
        scores=scores,
        steps=steps,
    )
