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

All k * n rollouts of a step are one batched decode from forks of the baseline's KV cache of the prefix;
the prefix is never run again. The baseline's cache follows the decoded rows (one token per step); when
the baseline is the decoding model itself, the loop's own cache is forked instead.

With a sampling engine (`engine=VLLMEngine(baseline_folder)`) the rollouts run in the engine instead:
all rows x candidates x rollouts of a step in one generate call, each request prompt + response so far +
candidate as token ids (the engine's prefix cache shares the prefix), with the same seeds and limits;
no local copy of the baseline's cache is kept. The prior's top-k candidates and the draw still come from
the in-process policy (one cached forward pass per token, small beside the k * H rollout tokens).
"""

from __future__ import annotations

import copy
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
        }


class TransferQGuide(TopKGuide):
    """Scores the prior's top-k candidates with rollout Q-values (see the module docstring)."""

    name = "transfer_q"

    def __init__(self, baseline: BaselineModel, reward, *, k: int, rollout_len: int | None, num_rollouts: int,
                 rollout_sampling: str, rollout_temperature: float, baseline_reward, beta: float,
                 normalize_weights: bool, max_rollout_rows: int, trace_rollouts: bool,
                 engine: SamplingEngine | None = None):
        super().__init__(k)
        self.engine = engine
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
        if state.owns_session:
            dev = state.session.device
            state.session.step(tokens.to(dev), None if advance is None else advance.to(dev))

    def after_select(self, state: TransferQState, index: torch.Tensor) -> None:
        if state.owns_session:
            state.session.select(index.to(state.session.device))
        idx = index.cpu()
        state.seeds = state.seeds[idx]
        state.origin = [state.origin[i] for i in idx.tolist()]
        if state.prompt_texts is not None:
            state.prompt_texts = [state.prompt_texts[i] for i in idx.tolist()]

    # ------------------------------------------------------------------------------------ rollouts
    @torch.no_grad()
    def _rollouts(self, state: TransferQState, rows: torch.Tensor, first: torch.Tensor, seeds: torch.Tensor,
                  limits: torch.Tensor) -> list[list[int]]:
        """Rollouts from forks of the prefix cache: row rows[j] of the batch, extended by token first[j],
        then up to limits[j] tokens from the baseline. One batched decode per chunk of max_rollout_rows."""
        if self.engine is not None:
            return self._engine_rollouts(state, rows, first, seeds, limits)
        out: list[list[int]] = []
        settings, dev = state.settings, state.session.device
        greedy = self.rollout_sampling == "greedy"
        for c0 in range(0, rows.shape[0], self.max_rollout_rows):
            sl = slice(c0, c0 + self.max_rollout_rows)
            fork = state.session.fork(rows[sl].to(dev))
            logits = fork.step(first[sl].to(dev))
            sampling = SamplingRows.build(
                fork.batch_size, temperature=self.rollout_temperature, greedy=greedy, seed=seeds[sl], device=dev
            )
            done = decode(fork, logits, sampling=sampling, max_new_tokens=limits[sl].to(dev),
                          stop_ids=settings.stop_ids, pad_id=settings.pad_id)
            state.rollout_forward_tokens += fork.forward_tokens
            # decode drops finished rows from the fork as it goes; its output keeps every row, in order.
            out += [done.tokens[j, : int(done.lengths[j])].tolist() for j in range(done.lengths.shape[0])]
        return out

    def _engine_rollouts(self, state: TransferQState, rows: torch.Tensor, first: torch.Tensor, seeds: torch.Tensor,
                         limits: torch.Tensor) -> list[list[int]]:
        """The same rollouts from the engine, all in one generate call (it batches and schedules them)."""
        sampling = replace(state.settings, do_sample=self.rollout_sampling == "sample",
                           temperature=self.rollout_temperature, top_k=0, top_p=1.0, min_p=0.0)
        prefixes = state.prefixes()
        starts = [prefixes[r] + [t] for r, t in zip(rows.tolist(), first.tolist())]
        sampled = self.engine.generate(starts, limits, sampling, seeds)
        state.rollout_forward_tokens += sampled.forward_tokens
        return [c.tokens for c in sampled.flat()]

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
        run = (flat_limits > 0).nonzero().flatten()
        if run.numel():
            for j, tail in zip(run.tolist(), self._rollouts(state, row_of[run], first[run], seeds.flatten()[run],
                                                            flat_limits[run]), strict=True):
                tails[j] = tail
        completions = [state.generated[int(row_of[j])] + [int(first[j])] + tails[j] for j in range(len(tails))]
        rows = row_of.tolist()
        r = self._score(self.reward, state, rows, completions).view(batch, k, n)
        r_bl = None
        if self.baseline_reward is not None:
            r_bl = self._score(self.baseline_reward, state, rows, completions).view(batch, k, n)
        q = q_estimate(r, r_bl, self.beta, self.normalize_weights).float()
        state.rollouts += run.numel()  # stop candidates and H = 0 need none
        state.rollout_tokens += sum(len(t) for t in tails)
        for b in range(batch):
            entry = {"candidates": cands[b].tolist(), "q": q[b].tolist()}
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
            "rollouts": 0, "rollout_tokens": 0, "reward_calls": 0, "reward_pairs": 0, "baseline_forward_tokens": 0}
        out.extras = TransferQReport(
            **accounting, prior_forward_tokens=session.forward_tokens,
            trace=states[0].trace if states else [[] for _ in range(out.tokens.shape[0])])
        out.sampled_tokens = out.total_sampled() + out.extras.rollout_tokens
        return out
