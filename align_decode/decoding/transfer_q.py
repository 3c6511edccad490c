"""Transfer Q* (Chakraborty et al., NeurIPS 2024): Q-values of candidate tokens from rollouts of an
aligned baseline model, scored by the target reward.

At each step, with prior pi (the SFT policy), candidates C = top-k of pi, and an aligned baseline rho_BL:

    Q(s, z)  ~  estimated from n rollouts tau_1..tau_n ~ rho_BL(. | s, z) of at most H tokens
    pi*(z | s)  ∝  pi(z | s)^(1/T) * exp(alpha * Q(s, z))        for z in C (0 elsewhere)

- direct transfer (the target reward is the baseline's):   Q = mean_i r(s, z, tau_i);
- indirect transfer (target r, baseline reward r_BL): rho*_r ∝ rho_BL * exp((r - r_BL) / beta), so each
  rollout gets the importance weight w_i = exp((r_i - r_BL_i) / beta) and

      Q = sum_i w_i r_i / sum_i w_i          (normalize_weights=True: self-normalised; with n = 1, Q = r)
      Q = mean_i w_i r_i                     (normalize_weights=False: the official code, no normaliser).

All k * n rollouts of a step are one batched decode from forks of the baseline's KV cache of the prefix
(recycled rollouts that need more tokens, below, another); the prefix is never run again. The baseline's
cache follows the decoded rows (one token per step); when the baseline is the decoding model itself, the
loop's own cache is forked instead.

With a sampling engine (`engine=VLLMEngine(baseline_folder)`) the rollouts run in the engine instead:
all rows x candidates x rollouts of a step in one generate call, each request prompt + response so far +
candidate as token ids (the engine's prefix cache shares the prefix), with the same seeds and limits;
no local copy of the baseline's cache is kept. The prior's top-k candidates and the draw still come from
the in-process policy (one cached forward pass per token, small beside the k * H rollout tokens).

Rollout recycling (greedy rollouts, n = 1, `recycle_rollouts=True`): the rollout tau = (tau_1, ..., tau_m) of
the token z* chosen at step t is the greedy continuation of s + z*, so the greedy rollout of the next step's
candidate tau_1 from s + z* + tau_1 starts with tau_2 .. tau_m. That candidate's rollout is taken from it:
when tau ended on a stop token, or the next limit is at most m - 1 tokens, it is complete (no tokens
generated); otherwise the baseline continues s + z* + tau for the missing tokens only (one token with a fixed
H). Exact: the same tokens as rolling out from scratch, up to floating-point ties between the two
computations (greedy argmax of logits computed in another batch).

Pruning by the reward's range (greedy decoding, `reward_bounds=(low, high)` declared): Q lies in [low, high]
(direct transfer, or self-normalised weights), so with z = l / T + alpha Q a candidate c with
(l_top - l_c) / T > |alpha| (high - low) scores below the prior's top candidate whatever the rollouts say: it
cannot be the argmax and is not rolled out (its Q is reported as the bound that ranks it lowest). The chosen
tokens are those of rolling every candidate out; every reward computed is checked against the declared range.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..kernels import SamplingRows, derive_seeds
from .candidates import score_completions
from .engine import SamplingEngine, engine_argument
from .guides.base import GuideContext
from .guides.lm import LMGuide
from .guides.topk import TopKGuide, TopKGuideState
from .loop import Decoded, decode
from .options import TransferQOptions
from .report import Report
from .prompts import PromptBatch
from .session import ModelSession
from .settings import GenerationSettings
from .strategy import Policy, TokenStrategy

# Mixed into the row seeds so that rollout draws never reuse the stream of the row's own tokens.
_ROLLOUT_STREAM = 0x7A51


# ------------------------------------------------------------------------------------ pure functions
def q_estimate(
    rewards: torch.Tensor,
    baseline_rewards: torch.Tensor | None = None,
    beta: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Q [...] from the rewards of n rollouts per candidate ([..., n]).

    Direct (no baseline rewards): the Monte-Carlo mean of r. Indirect: importance-weighted by
    w = exp((r - r_BL) / beta); normalised weights are softmax((r - r_BL) / beta) over the rollouts
    (computed stably); unnormalised ones are the raw exponentials averaged as the official code does."""
    r = rewards.double()
    if baseline_rewards is None:
        return r.mean(-1)
    log_w = (r - baseline_rewards.double()) / beta
    if normalize:
        return (torch.softmax(log_w, -1) * r).sum(-1)
    q = (log_w.exp() * r).mean(-1)
    if not bool(torch.isfinite(q).all()):
        raise ValueError(
            "the importance weight exp((r - r_BL) / beta) overflowed: use a larger beta or normalize_weights=True"
        )
    return q


def rollout_seeds(row_seeds: torch.Tensor, steps: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Seeds [B, k, n] of the rollouts: a pure function of (row seed, step, candidate token, rollout index),
    so a candidate's rollouts are the same whatever the batch, the other candidates or k."""
    step_seed = derive_seeds(derive_seeds(row_seeds, _ROLLOUT_STREAM), steps)  # [B]
    index = candidates.long().unsqueeze(-1) * n + torch.arange(n, device=candidates.device)  # [B, k, n]
    return derive_seeds(step_seed.view(-1, 1, 1), index)


def rollout_limits(
    candidates: torch.Tensor,
    generated: torch.Tensor,
    stop_ids: Sequence[int],
    rollout_len: int | None,
    max_new_tokens: int,
) -> torch.Tensor:
    """Tokens each candidate's rollouts may generate [B, k]: none after a stop candidate (the response
    ends there); else H, or with rollout_len=None the rest of the response budget (the paper's full
    rollouts: max_new_tokens minus the tokens so far minus the candidate)."""
    if rollout_len is None:
        limit = (max_new_tokens - generated - 1).clamp(min=0).unsqueeze(-1).expand_as(candidates)
    else:
        limit = torch.full_like(candidates, rollout_len)
    stops = torch.as_tensor(list(stop_ids), dtype=candidates.dtype, device=candidates.device)
    return torch.where(torch.isin(candidates, stops), torch.zeros_like(limit), limit)


def _check_finite_rewards(values: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(
            f"reward {name!r} returned non-finite values ({values[bad][:3].tolist()}) for rollout(s) "
            f"{bad.nonzero().flatten()[:5].tolist()}: Transfer Q* needs finite rewards"
        )


# ----------------------------------------------------------------------------------------- the guide
class BaselineModel(LMGuide):
    """The aligned baseline rho_BL that rolls candidates out; it must share the policy's tokenizer."""

    role = "baseline model"


class TransferQState(TopKGuideState):
    """Per-batch state: the baseline's cache of every row's prefix, seeds, and the run's accounting."""

    def __init__(self, guide: "TransferQGuide", batch: PromptBatch, session: ModelSession, owns_session: bool,
                 seeds: torch.Tensor, settings: GenerationSettings, tokenizer):
        super().__init__(guide, batch, tokenizer)
        self.session = session
        # False when the baseline is the decoding model itself: the loop's own session (which the loop
        # keeps at each row's prefix) is forked instead of a copy advanced in parallel.
        self.owns_session = owns_session
        self.seeds = seeds.cpu()
        self.settings = settings
        self.origin = list(range(len(self.prompts)))  # original row of each live row
        needs_text = any(not hasattr(r, "score_ids") for r in guide.rewards())
        self.prompt_texts = batch.prompt_texts(tokenizer) if needs_text else None
        rows = len(self.prompts)
        # Per original row, per step: the candidates, their Q-values (and rollouts when traced).
        self.trace: list[list[dict]] = [[] for _ in range(rows)]
        self.rollout_tokens = 0
        self.rollouts = 0  # rollouts generated (a stop candidate needs none)
        self.reward_calls = 0
        self.reward_pairs = 0
        self.rollout_forward_tokens = 0
        self.rollout_cached_tokens = 0  # prompt tokens of the engine's rollout requests served from its cache
        self.recycled_rollouts = 0  # rollouts taken (in part or whole) from the previous step's chosen one
        self.recycled_tokens = 0  # rollout tokens taken from there instead of generated again
        # Per live row: this step's rollout of each candidate (recycling only), and after the row advances,
        # the rollout of the token it took (None when there is none to recycle).
        self.step_rollouts: list[dict[int, tuple[list[int], bool]] | None] = [None] * rows
        self.recycle: list[tuple[list[int], bool] | None] = [None] * rows
        self.policy_logits: torch.Tensor | None = None  # this step's prior logits [B, V] (for pruning)
        self.pruned_candidates = 0

    def next_scores(self, policy_logits: torch.Tensor) -> torch.Tensor:
        self.policy_logits = policy_logits
        return super().next_scores(policy_logits)

    def accounting(self) -> dict:
        return {
            "rollouts": self.rollouts,
            "rollout_tokens": self.rollout_tokens,
            "reward_calls": self.reward_calls,
            "reward_pairs": self.reward_pairs,
            # The prefix cache's forward tokens (prompts and one token per step, unless the loop's session
            # is shared) plus the rollouts'.
            "baseline_forward_tokens": (self.session.forward_tokens if self.owns_session else 0)
            + self.rollout_forward_tokens,
            "rollout_cached_tokens": self.rollout_cached_tokens,
            "recycled_rollouts": self.recycled_rollouts,
            "recycled_tokens": self.recycled_tokens,
            "pruned_candidates": self.pruned_candidates,
        }


class TransferQGuide(TopKGuide):
    """Scores the prior's top-k candidates with rollout Q-values (see the module docstring)."""

    name = "transfer_q"

    def __init__(self, baseline: BaselineModel, reward, *, k: int, rollout_len: int | None, num_rollouts: int,
                 rollout_sampling: str, rollout_temperature: float, baseline_reward, beta: float,
                 normalize_weights: bool, max_rollout_rows: int, trace_rollouts: bool,
                 engine: SamplingEngine | None = None, recycle_rollouts: bool = True,
                 reward_bounds: tuple[float, float] | None = None, alpha: float = 1.0):
        super().__init__(k)
        self.reward_bounds, self.alpha = reward_bounds, alpha  # alpha: the strategy's, for pruning
        self.engine = engine
        # Recycling is exact for greedy rollouts only (a sampled rollout is one draw among many).
        self.recycle_rollouts = bool(recycle_rollouts) and rollout_sampling == "greedy" and num_rollouts == 1
        self.baseline, self.reward, self.baseline_reward = baseline, reward, baseline_reward
        self.rollout_len, self.num_rollouts = rollout_len, num_rollouts
        self.rollout_sampling, self.rollout_temperature = rollout_sampling, rollout_temperature
        self.beta, self.normalize_weights = beta, normalize_weights
        self.max_rollout_rows, self.trace_rollouts = max_rollout_rows, trace_rollouts

    def rewards(self) -> list:
        return [self.reward] + ([self.baseline_reward] if self.baseline_reward is not None else [])

    def width_for(self, policy_model, policy_tokenizer) -> int:
        width = self.baseline.width_for(policy_model, policy_tokenizer)
        if self.k > width:
            raise ValueError(f"k={self.k} is larger than the vocabulary ({width} tokens)")
        return width

    @torch.no_grad()
    def start(self, context: GuideContext) -> TransferQState:
        """The state for a batch. When the baseline is the decoding model, the loop's session already
        holds every row's prefix whenever candidates are scored: the rollouts fork it."""
        batch, width = context.batch, context.width
        settings = context.settings or GenerationSettings(max_new_tokens=0)
        seeds, tokenizer = context.row_seeds(), context.tokenizer
        shared_session = context.policy_session
        if shared_session is not None and shared_session.model is not self.baseline.model:
            shared_session = None
        if self.engine is not None:
            # The engine rolls out from token ids: no local cache of the baseline follows the rows.
            return TransferQState(self, batch, None, False, seeds, settings, tokenizer or self.baseline.tokenizer)
        session = shared_session
        if session is None:
            session = ModelSession(self.baseline.model, vocab_size=width)
            session.prefill(batch.input_ids.to(session.device), batch.attention_mask.to(session.device))
        return TransferQState(self, batch, session, shared_session is None, seeds, settings,
                              tokenizer or self.baseline.tokenizer)

    def after_advance(self, state: TransferQState, tokens: torch.Tensor, advance: torch.Tensor | None) -> None:
        if self.recycle_rollouts:
            for b, token in enumerate(tokens.tolist()):
                moved = advance is None or bool(advance[b])
                step = state.step_rollouts[b]
                state.recycle[b] = step.get(token) if moved and step is not None else None
                state.step_rollouts[b] = None
        if state.owns_session:
            dev = state.session.device
            state.session.step(tokens.to(dev), None if advance is None else advance.to(dev))

    def after_select(self, state: TransferQState, index: torch.Tensor) -> None:
        if state.owns_session:
            state.session.select(index.to(state.session.device))
        idx = index.cpu()
        state.seeds = state.seeds[idx]
        state.origin = [state.origin[i] for i in idx.tolist()]
        state.step_rollouts = [state.step_rollouts[i] for i in idx.tolist()]
        state.recycle = [state.recycle[i] for i in idx.tolist()]
        if state.prompt_texts is not None:
            state.prompt_texts = [state.prompt_texts[i] for i in idx.tolist()]

    # ------------------------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def _rollouts(self, state: TransferQState, rows: torch.Tensor, starts: list[list[int]], seeds: torch.Tensor,
                  limits: torch.Tensor) -> list[list[int]]:
        """The tokens the baseline generates after row rows[j]'s prefix extended by starts[j] (the candidate,
        or a recycled rollout's tokens), at most limits[j] of them, from forks of the prefix cache: one batched
        decode per start length and chunk of max_rollout_rows."""
        if self.engine is not None:
            return self._engine_rollouts(state, rows, starts, seeds, limits)
        out: list[list[int]] = [[] for _ in starts]
        settings, dev = state.settings, state.session.device
        greedy = self.rollout_sampling == "greedy"
        by_width: dict[int, list[int]] = {}
        for j, start in enumerate(starts):
            by_width.setdefault(len(start), []).append(j)
        for group in by_width.values():
            for c0 in range(0, len(group), self.max_rollout_rows):
                chunk = group[c0: c0 + self.max_rollout_rows]
                index = torch.tensor(chunk)
                fork = state.session.fork(rows[index].to(dev))
                logits = fork.step(torch.tensor([starts[j] for j in chunk], dtype=torch.long, device=dev))
                sampling = SamplingRows.build(
                    fork.batch_size, temperature=self.rollout_temperature, greedy=greedy, seed=seeds[index], device=dev
                )
                done = decode(fork, logits, sampling=sampling, max_new_tokens=limits[index].to(dev),
                              stop_ids=settings.stop_ids, pad_id=settings.pad_id)
                state.rollout_forward_tokens += fork.forward_tokens
                # decode drops finished rows from the fork as it goes; its output keeps every row, in order.
                for i, j in enumerate(chunk):
                    out[j] = done.tokens[i, : int(done.lengths[i])].tolist()
        return out

    def _engine_rollouts(self, state: TransferQState, rows: torch.Tensor, starts: list[list[int]],
                         seeds: torch.Tensor, limits: torch.Tensor) -> list[list[int]]:
        """The same rollouts from the engine, all in one generate call (it batches and schedules them; the rows'
        shared prefixes come from its prefix cache)."""
        sampling = replace(state.settings, do_sample=self.rollout_sampling == "sample",
                           temperature=self.rollout_temperature, top_k=0, top_p=1.0, min_p=0.0)
        prefixes = state.prefixes()
        requests = [prefixes[r] + start for r, start in zip(rows.tolist(), starts)]
        sampled = self.engine.generate(requests, limits, sampling, seeds)
        state.rollout_forward_tokens += sampled.forward_tokens
        state.rollout_cached_tokens += sampled.cached_tokens
        return [c.tokens for c in sampled.flat()]

    def _recycled(self, state: TransferQState, row: int, candidate: int, limit: int) -> tuple[list[int], int] | None:
        """(the kept tokens, how many more the baseline must generate) of a candidate's rollout taken from the
        rollout of the token the row took last step, or None when that rollout does not start with it."""
        old = state.recycle[row] if self.recycle_rollouts else None
        if old is None or not old[0] or old[0][0] != candidate:
            return None
        tau, stopped = old
        kept = tau[1: 1 + limit]
        return kept, 0 if stopped else limit - len(kept)

    def _pruned(self, state: TransferQState, cands: torch.Tensor) -> torch.Tensor:
        """[B, k] candidates that cannot be chosen whatever their rollouts give (see the module docstring):
        none unless the reward's range is declared and the loop decodes greedily."""
        if self.reward_bounds is None or state.settings.do_sample or self.alpha == 0 or state.policy_logits is None:
            return torch.zeros(cands.shape, dtype=torch.bool)
        low, high = self.reward_bounds
        z = state.policy_logits.detach().float().cpu().gather(-1, cands) / float(state.settings.temperature)
        gap = z.max(-1, keepdim=True).values - z
        # A margin for float32 rounding in the loop's mix: prune only what is certainly out of reach.
        return gap > abs(self.alpha) * (high - low) + 1e-3

    def _check_bounds(self, values: torch.Tensor) -> None:
        if self.reward_bounds is None:
            return
        low, high = self.reward_bounds
        bad = (values < low - 1e-9) | (values > high + 1e-9)
        if bool(bad.any()):
            raise ValueError(
                f"reward {getattr(self.reward, 'name', type(self.reward).__name__)!r} returned "
                f"{values[bad][:3].tolist()} outside reward_bounds ({low}, {high}): pruning would not be exact"
            )

    def _score(self, reward, state: TransferQState, rows: list[int], completions: list[list[int]]) -> torch.Tensor:
        prompt_texts = None if state.prompt_texts is None else [state.prompt_texts[b] for b in rows]
        prompt_ids = [state.prompts[b] for b in rows]
        values = score_completions(reward, state.tokenizer, prompt_texts, completions, prompt_ids)
        state.reward_calls += 1
        state.reward_pairs += len(completions)
        _check_finite_rewards(values, getattr(reward, "name", type(reward).__name__))
        return values

    def score_candidates(self, state: TransferQState, candidates: torch.Tensor) -> torch.Tensor:
        cands = candidates.cpu()
        batch, k = cands.shape
        n = self.num_rollouts
        generated = torch.tensor([len(g) for g in state.generated], dtype=torch.long)
        limits = rollout_limits(cands, generated, state.settings.stop_ids, self.rollout_len,
                                state.settings.max_new_tokens)
        seeds = rollout_seeds(state.seeds, generated, cands, n)  # [B, k, n]
        # Flat rollout j = (row b, candidate c, rollout i) in row-major order.
        row_of = torch.arange(batch).repeat_interleave(k * n)
        first = cands.repeat_interleave(n, dim=1).flatten()
        flat_limits = limits.repeat_interleave(n, dim=1).flatten()
        tails: list[list[int]] = [[] for _ in range(batch * k * n)]
        pruned = self._pruned(state, cands).repeat_interleave(n, dim=1).flatten()
        run, starts, needs = [], [], []  # rollouts the baseline generates (all or the missing end of)
        for j in ((flat_limits > 0) & ~pruned).nonzero().flatten().tolist():
            b, c, limit = int(row_of[j]), int(first[j]), int(flat_limits[j])
            recycled = self._recycled(state, b, c, limit)
            if recycled is None:
                run.append(j), starts.append([c]), needs.append(limit)
                continue
            tails[j], missing = recycled
            state.recycled_rollouts += 1
            state.recycled_tokens += len(tails[j])
            if missing > 0:  # continue prefix + c + the kept tokens (= prefix + the old rollout)
                run.append(j), starts.append([c] + tails[j]), needs.append(missing)
        if run:
            index = torch.tensor(run)
            got = self._rollouts(state, row_of[index], starts, seeds.flatten()[index],
                                 torch.tensor(needs, dtype=torch.long))
            for j, tail in zip(run, got, strict=True):
                tails[j] = tails[j] + tail
        if self.recycle_rollouts:
            stops = set(state.settings.stop_ids)
            for b in range(batch):
                state.step_rollouts[b] = {
                    int(first[j]): (tails[j], bool(tails[j]) and tails[j][-1] in stops)
                    for j in range(b * k, (b + 1) * k) if int(flat_limits[j]) > 0 and not bool(pruned[j])
                }
        scored = (~pruned).nonzero().flatten().tolist()
        completions = [state.generated[int(row_of[j])] + [int(first[j])] + tails[j] for j in scored]
        rows = [int(row_of[j]) for j in scored]
        r = torch.zeros(batch * k * n, dtype=torch.float64)
        r_bl = None if self.baseline_reward is None else torch.zeros(batch * k * n, dtype=torch.float64)
        if scored:
            r[scored] = self._score(self.reward, state, rows, completions).double()
            self._check_bounds(r[scored])
            if r_bl is not None:
                r_bl[scored] = self._score(self.baseline_reward, state, rows, completions).double()
        r = r.view(batch, k, n)
        r_bl = None if r_bl is None else r_bl.view(batch, k, n)
        q = q_estimate(r, r_bl, self.beta, self.normalize_weights).float()
        if bool(pruned.any()):
            low, high = self.reward_bounds
            q = torch.where(pruned.view(batch, k, n)[..., 0], float(low if self.alpha > 0 else high), q)
            state.pruned_candidates += int(pruned.sum()) // n
        state.rollouts += int(((flat_limits > 0) & ~pruned).sum())  # stop candidates and H = 0 need none
        state.rollout_tokens += sum(len(t) for t in tails)
        for b in range(batch):
            entry = {"candidates": cands[b].tolist(), "q": q[b].tolist()}
            if self.reward_bounds is not None:
                entry["pruned"] = pruned.view(batch, k, n)[b, :, 0].tolist()
            if self.trace_rollouts:
                entry["rollouts"] = [tails[(b * k + c) * n: (b * k + c + 1) * n] for c in range(k)]
                entry["rewards"] = r[b].tolist()
                if r_bl is not None:
                    entry["baseline_rewards"] = r_bl[b].tolist()
            state.trace[state.origin[b]].append(entry)
        return q


# -------------------------------------------------------------------------------------- the strategy
@dataclass
class TransferQReport(Report):
    """One call of Transfer Q*: what the rollouts cost, and (per row, per step) the candidates' Q-values."""

    rollouts: int  # rollouts generated (a stop candidate needs none)
    rollout_tokens: int
    reward_calls: int
    reward_pairs: int  # (prompt, response) pairs scored
    baseline_forward_tokens: int  # the baseline's token positions: its prefix cache and the rollouts
    rollout_cached_tokens: int  # the rollout requests' prompt tokens an engine served from its prefix cache
    recycled_rollouts: int  # rollouts taken from the previous step's chosen rollout (see rollout recycling)
    recycled_tokens: int  # rollout tokens taken from there instead of generated again
    pruned_candidates: int  # candidates not rolled out: out of reach given reward_bounds (greedy decoding)
    prior_forward_tokens: int  # the prior's token positions
    trace: list[list[dict]]  # [rows][steps] the candidates, their Q-values (and rollouts when traced)


class TransferQ(TokenStrategy):
    """Transfer Q*: steer the prior with Q-values from rollouts of an aligned baseline model.

        pi*(z | s)  ∝  pi(z | s)^(1/T) * exp(alpha * Q(s, z))   over the prior's top-k tokens z,

    Q(s, z) being the (importance-weighted, for indirect transfer) target reward of the baseline's
    rollouts from s + z; see the module docstring for the estimators. Greedy decoding takes
    argmax_z [log pi(z | s) + alpha * Q(s, z)]. alpha = 0 gives back the prior untouched (no rollouts).

    Args:
        baseline: the aligned baseline rho_BL (a transformers causal LM, e.g. a DPO model) that rolls
            candidates out; it must share the policy's tokenizer.
        reward: the target sequence reward r (text, or token ids via score_ids). It sees the prompt and
            the response so far + candidate + rollout.
        baseline_tokenizer: the baseline's tokenizer, checked against the policy's.
        alpha: weight of Q against log pi, any finite number (per call: `with_weights`).
        k: candidate tokens per step (the prior's top-k), >= 1.
        rollout_len: H, tokens per rollout (>= 0; a rollout also stops at EOS); None rolls out to the end
            of the response budget (the paper's full rollouts).
        num_rollouts: n rollouts per candidate, >= 1 (> 1 needs sampled rollouts).
        rollout_sampling: "greedy" (the official code) or "sample" (at rollout_temperature, seeded by the
            row's seed, the step, the candidate and the rollout index).
        transfer: "direct" or "indirect" (needs baseline_reward r_BL).
        beta: indirect transfer's temperature in exp((r - r_BL) / beta), > 0.
        normalize_weights: normalise the importance weights over the rollouts (the estimator); False
            reproduces the official code's unnormalised weights.
        prior: "policy" (the paper: the AlignedModel's model is pi_sft) or "baseline" (the official code:
            the baseline's logits are the prior term and the candidate source; the loop then decodes
            with the baseline model).
        max_rollout_rows: most rollout rows decoded at once (memory bound; results do not depend on it).
            In process only: an engine schedules the rollouts itself.
        trace_rollouts: keep every rollout's tokens and rewards in the output's trace.
        recycle_rollouts: with greedy rollouts (n = 1), take the rollout of the candidate that starts the
            last chosen token's rollout from that rollout (exact; see the module docstring). False rolls every
            candidate out from scratch.
        reward_bounds: (low, high), the target reward's range when it is known (e.g. (-1, 1) for VADER's
            compound). With greedy decoding, candidates whose prior gap to the top one exceeds
            |alpha| (high - low) are not rolled out: they cannot be chosen (exact; rewards outside the range
            raise). Direct transfer or normalised weights only (Q must stay in the range).
        engine: a SamplingEngine serving the baseline (e.g. VLLMEngine on the baseline's folder) that
            runs the rollouts; None rolls out in process. The prior still runs in process.

    Example:
        >>> tq = TransferQ(dpo_model, SentimentReward(), baseline_tokenizer=tok, alpha=2.0, k=10, rollout_len=20)
        >>> aligned = AlignedModel(sft_model, tokenizer=tok, strategy=tq)
        >>> out = aligned.generate(**inputs, max_new_tokens=32, return_dict_in_generate=True)
        >>> out.alignment["rollout_tokens"], out.alignment["reward_calls"]    # this call's cost
        >>> out = aligned.generate(**inputs, strategy=tq.with_weights(0.5))   # another alpha, no reload
    """

    name = "transfer_q"

    def __init__(
        self,
        baseline,
        reward,
        *,
        baseline_tokenizer=None,
        alpha: float = TransferQOptions.alpha,
        k: int = TransferQOptions.k,
        rollout_len: int | None = TransferQOptions.rollout_len,
        num_rollouts: int = TransferQOptions.num_rollouts,
        rollout_sampling: str = TransferQOptions.rollout_sampling,
        rollout_temperature: float = TransferQOptions.rollout_temperature,
        transfer: str = TransferQOptions.transfer,
        baseline_reward=None,
        beta: float = TransferQOptions.beta,
        normalize_weights: bool = TransferQOptions.normalize_weights,
        prior: str = TransferQOptions.prior,
        max_rollout_rows: int = TransferQOptions.max_rollout_rows,
        trace_rollouts: bool = TransferQOptions.trace_rollouts,
        engine: SamplingEngine | None = None,
        backend: SamplingEngine | None = None,
        recycle_rollouts: bool = True,
        reward_bounds: tuple[float, float] | None = None,
    ):
        if isinstance(baseline, LMGuide):
            baseline = BaselineModel(baseline.model, baseline.tokenizer or baseline_tokenizer, name=baseline.name)
        else:
            baseline = BaselineModel(baseline, baseline_tokenizer)
        for what, r in (("reward", reward), ("baseline_reward", baseline_reward)):
            if r is not None and not (callable(getattr(r, "score", None)) or callable(getattr(r, "score_ids", None))):
                raise TypeError(f"{what} must be a SequenceReward (score) or have score_ids, got {type(r).__name__}")
        if reward is None:
            raise ValueError("TransferQ needs a target reward")
        if not isinstance(recycle_rollouts, bool):
            raise TypeError(f"recycle_rollouts must be True or False, got {recycle_rollouts!r}")
        if reward_bounds is not None:
            if (not isinstance(reward_bounds, (tuple, list)) or len(reward_bounds) != 2
                    or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in reward_bounds)
                    or reward_bounds[0] > reward_bounds[1]):
                raise ValueError(f"reward_bounds must be (low, high), two finite numbers with low <= high, "
                                 f"got {reward_bounds!r}")
            reward_bounds = (float(reward_bounds[0]), float(reward_bounds[1]))
            if transfer == "indirect" and not normalize_weights:
                raise ValueError("reward_bounds needs Q within the reward's range: the raw importance weights of "
                                 "indirect transfer (normalize_weights=False) do not keep it there")
        o = self.options = TransferQOptions(
            alpha=alpha, k=k, rollout_len=rollout_len, num_rollouts=num_rollouts, rollout_sampling=rollout_sampling,
            rollout_temperature=rollout_temperature, transfer=transfer, beta=beta, normalize_weights=normalize_weights,
            prior=prior, max_rollout_rows=max_rollout_rows, trace_rollouts=trace_rollouts)
        if transfer == "indirect" and baseline_reward is None:
            raise ValueError("transfer='indirect' needs baseline_reward (r_BL, the reward the baseline is aligned to)")
        if transfer == "direct" and baseline_reward is not None:
            raise ValueError("baseline_reward is used by transfer='indirect' only")
        engine = engine_argument(engine, backend)
        if engine is not None and not isinstance(engine, SamplingEngine):
            raise TypeError(f"engine must be a SamplingEngine (e.g. VLLMEngine), got {type(engine).__name__}")
        self.alpha, self.transfer, self.prior = o.alpha, o.transfer, o.prior
        self.guide = TransferQGuide(
            baseline, reward, k=o.k, rollout_len=o.rollout_len, num_rollouts=o.num_rollouts,
            rollout_sampling=o.rollout_sampling, rollout_temperature=o.rollout_temperature,
            baseline_reward=baseline_reward, beta=o.beta, normalize_weights=o.normalize_weights,
            max_rollout_rows=o.max_rollout_rows, trace_rollouts=o.trace_rollouts, engine=engine,
            recycle_rollouts=recycle_rollouts, reward_bounds=reward_bounds, alpha=o.alpha,
        )

    @classmethod
    def official(cls, baseline, reward, *, baseline_tokenizer=None, transfer: str = "direct",
                 baseline_reward=None, **overrides) -> "TransferQ":
        """The released code's settings: the baseline is the prior, k = 10, rm_weight alpha = 1, one greedy
        rollout of 20 tokens (direct) or 5 (indirect), unnormalised weights exp(0.5 (r - r_BL)).
        Use with greedy decoding (do_sample=False), as the code only takes the argmax."""
        settings = dict(prior="baseline", k=10, alpha=1.0, rollout_len=20 if transfer == "direct" else 5,
                        num_rollouts=1, rollout_sampling="greedy", beta=2.0, normalize_weights=False)
        settings.update(overrides)
        return cls(baseline, reward, baseline_tokenizer=baseline_tokenizer, transfer=transfer,
                   baseline_reward=baseline_reward, **settings)

    def with_weights(self, alpha) -> "TransferQ":
        """The same models and rollout settings with another alpha (a float or a one-element sequence)."""
        if isinstance(alpha, (list, tuple)):
            if len(alpha) != 1:
                raise ValueError(f"TransferQ has one weight (alpha), got {len(alpha)}")
            alpha = alpha[0]
        other = copy.copy(self)
        other.alpha = TransferQOptions.spec("alpha").validate(alpha)
        other.guide = copy.copy(self.guide)  # the guide prunes with its strategy's alpha
        other.guide.alpha = other.alpha
        return other

    def guides(self):
        return [self.guide]

    def mixing(self, settings: GenerationSettings) -> tuple[float, list[float]]:
        return settings.temperature, [self.alpha]

    def hyperparameters(self) -> dict:
        g = self.guide
        return {
            "baseline": g.baseline.name, "reward": getattr(g.reward, "name", None),
            "baseline_reward": getattr(g.baseline_reward, "name", None), "alpha": self.alpha, "k": g.k,
            "rollout_len": g.rollout_len, "num_rollouts": g.num_rollouts, "rollout_sampling": g.rollout_sampling,
            "rollout_temperature": g.rollout_temperature, "transfer": self.transfer, "beta": g.beta,
            "normalize_weights": g.normalize_weights, "prior": self.prior, "max_rollout_rows": g.max_rollout_rows,
            "recycle_rollouts": g.recycle_rollouts, "reward_bounds": g.reward_bounds,
            **({"engine": g.engine.name} if g.engine is not None else {}),
        }

    def decoder(self, policy: Policy) -> Policy:
        if self.prior == "baseline":
            tokenizer = policy.tokenizer if policy.tokenizer is not None else self.guide.baseline.tokenizer
            return Policy(self.guide.baseline.model, tokenizer)
        return policy

    def finish(self, out: Decoded, session, states: list) -> Decoded:
        # alpha = 0 drops the guide (weight 0): no rollouts ran.
        accounting = states[0].accounting() if states else {
            "rollouts": 0, "rollout_tokens": 0, "reward_calls": 0, "reward_pairs": 0, "baseline_forward_tokens": 0,
            "rollout_cached_tokens": 0, "recycled_rollouts": 0, "recycled_tokens": 0, "pruned_candidates": 0}
        out.extras = TransferQReport(
            **accounting, prior_forward_tokens=session.forward_tokens,
            trace=states[0].trace if states else [[] for _ in range(out.tokens.shape[0])])
        out.sampled_tokens = out.total_sampled() + out.extras.rollout_tokens
        return out
