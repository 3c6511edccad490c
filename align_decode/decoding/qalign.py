"""QAlign (Faria & Smith, 2025): Metropolis-Hastings over whole responses.

Target:  pi(y | x) ∝ p(y | x) * exp(r(x, y) / beta),  with p the policy at the sampling temperature.

State 0 is one ordinary sample. Each step, for the current response y of n tokens (stop token included):
  1. draw an index i uniformly from {0, ..., n-1};
  2. keep y_<i and draw a new suffix y'_>=i from p(. | x, y_<i) until a stop token or the length cap;
  3. accept y' with probability min(1, exp(clip((r(y') - r(y)) / beta + log n - log n', ±20))).
The policy terms cancel because the proposal draws from p itself; the length terms account for the index
being uniform over a different number of positions in each direction. This is detailed balance with the
index as an auxiliary variable, so pi is the stationary law (tests check it on an enumerable model).

The kept prefix is never recomputed: each chain keeps its KV cache; a proposal continues a copy of it cut
back to y_<i (re-feeding one token for its logits), and the chain keeps whichever cache its MH step keeps.
With a sampling engine (`engine=VLLMEngine(...)`) each proposal submits the chain's prompt + y_<i as token
ids with the remaining budget, and the engine's prefix cache serves the kept prefix (on vLLM's CPU build
the engine uses 32-token blocks, so every full block of prompt + y_<i hits); with the response cap the
chains are pipelined on the engine's request queue (each submits its next proposal as soon as its last
returned and was scored), with the official suffix cap they run in lockstep (`pipeline=` chooses). The index, the acceptance draw and the suffix seed of each chain
and step are the same as in process, so the chains and their law do not depend on the schedule.

Pre-fetching (`prefetch=d`, engine, lockstep): a chain in state y proposes at step k from y and, if that
proposal is rejected, at step k+1 from y again, and so on: the proposals of steps k .. k+d-1 on the
all-rejected branch all continue y, with cuts and seeds fixed by the chain's seed, so one engine call can
draw them all before any is scored (Brockwell 2006, "Parallel Markov chain Monte Carlo simulation by
pre-fetching"). They are then judged in step order; the first accepted one moves the chain and the rest
are discarded. Every proposal a chain uses is the one the one-step-at-a-time chain draws, so the chains
(and their law) are unchanged; the engine draws more tokens in fewer, wider calls. One call advances a
chain 1 + (1-a) + ... + (1-a)^(d-1) steps on average at acceptance rate a, but an accepted proposal still
ends its round, so lockstep rounds never fall below the acceptances of the most-accepting chain. It pays
only where a wider engine step costs little more than a narrow one (few chains on the engine) and a is
low; on vLLM's CPU build (4 chains, a = 0.47) prefetch=2 took 0.94x the one-step lockstep time
(benchmarks/RESULTS.md, issue 20), so it is off by default.

Official-code compatibility: rewards are clamped to ±40 (reward_clamp) and the log-ratio to ±20
(log_ratio_clamp). The official code clamps rewards in its reward-model classes, not in its chain: a plain
official `Reward` (a word count, say) is not clamped, so matching it needs reward_clamp=None. With the
clamp the target is p(y|x) exp(clip(r, ±40) / beta), the paper's p exp(r / beta) wherever |r| <= 40;
where rewards pass 40 every response past the clamp scores the same, and the chain accepts more often.
`length_cap="suffix"` lets max_new_tokens bound each new suffix instead of the whole response, as the
official code does (responses can then grow along the chain and the target is no longer over a fixed set
of responses); the default "response" caps the whole response.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from ..kernels import derive_seeds, row_uniform
from .engine import SamplingEngine, engine_argument
from .best_of_n import vote
from .candidates import score_completions
from .loop import Decoded, decode
from .options import QAlignOptions
from .report import Report
from .prompts import PromptBatch, left_pad
from .session import ModelSession
from .settings import GenerationSettings, validate_ids
from .strategy import Strategy

# Substreams of a chain step's seed: which position to cut at, the acceptance draw, the suffix tokens.
_INDEX, _ACCEPT, _SUFFIX = 0, 1, 2


def acceptance_log_ratio(
    r_new: torch.Tensor,
    r_old: torch.Tensor,
    len_new: torch.Tensor,
    len_old: torch.Tensor,
    beta: float,
    clamp: float | None = 20.0,
) -> torch.Tensor:
    """log A = (r' - r) / beta + log|y| - log|y'|, clipped to ±clamp (None: no clip)."""
    log_a = (r_new.double() - r_old.double()) / beta + torch.log(len_old.double()) - torch.log(len_new.double())
    return log_a if clamp is None else log_a.clamp(-clamp, clamp)


def clamp_reward(r: torch.Tensor, clamp: float | None) -> torch.Tensor:
    return r if clamp is None else r.clamp(-clamp, clamp)


@dataclass
class QAlignTrace(Report):
    """Every chain's path in one call; rows are chains, prompt-major (`chains_per_prompt` per prompt)."""

    states: list[list[list[int]]]  # [steps + 1][rows] each chain's state after each step (state 0 first)
    state_logprobs: list[list[list[float]]]  # their tokens' log-probs under the law they were drawn from
    rewards: torch.Tensor  # [steps + 1, rows] the states' rewards
    accepted: torch.Tensor  # [steps + 1, rows] bool (state 0 counts as accepted)
    indices: list[torch.Tensor]  # [steps][rows] the cut position of each proposal
    proposals: list[list[list[int]]]  # [steps][rows] each proposal
    proposal_rewards: list[torch.Tensor]  # [steps][rows]
    acceptance_rate: torch.Tensor  # [rows]
    forward_tokens: int  # token positions run through the policy (or computed by the engine)
    chains_per_prompt: int
    cached_tokens: int | None = None  # prefix tokens an engine's prefix cache served (engine only)
    discarded_proposals: int | None = None  # pre-fetched proposals drawn but never judged (prefetch > 1 only)


@dataclass
class QAlignReport(Report):
    """One call of QAlign: the chains' trace, and which states were returned with their rewards."""

    trace: QAlignTrace
    chosen: list[list[tuple[int, int]]]  # [prompts][returned] (step, chain) of each returned state
    rewards: torch.Tensor  # [returned rows] their rewards


class QAlign(Strategy):
    """Sample from p(y|x) exp(r(x,y)/beta) by Metropolis-Hastings suffix resampling.

    Args:
        reward: a SequenceReward (text) or an object with `score_ids`.
        beta: > 0; smaller trusts the reward more. beta -> infinity gives the policy's own law.
        steps: MH steps per chain (each costs about half a response of decoding and one reward call).
        chains: independent chains per prompt, run together in one batch.
        burn_in, thin: which states the majority / best answers read: steps >= burn_in, every thin-th.
        answer: "last" (each chain's final state), "majority" (vote over extracted answers of the kept
            states of all chains), or "best" (the highest-reward kept state).
        extract: text -> answer, for answer="majority" [extract_answer of answer_kind].
        answer_kind: what the majority vote compares, when no extract is given: the final number, the
            \\boxed{} answer or the option letter (`rewards.extract_answer`).
        reward_clamp, log_ratio_clamp: the official code's ±40 and ±20; None turns one off.
        length_cap: "response" (max_new_tokens caps the whole response) or "suffix" (official code).
        reuse_prefix: keep each chain's KV cache and cut it back (default). False re-runs prompt and kept
            prefix from scratch every step, as a plain generate() call would: the same chain, slower;
            it is the baseline of the benchmark. Applies in process only.
        engine: a SamplingEngine (e.g. VLLMEngine) that draws state 0 and every suffix; None decodes in
            process. The trace's forward_tokens then counts what the engine computed, and cached_tokens
            the prefix tokens its prefix cache served.
        pipeline: with an engine, True: each chain submits its next proposal as soon as its last one
            returned and was scored (the engine's request API: no chain waits for another, every chain of
            every prompt stays in flight); False: the chains in lockstep, one engine call per step. Both
            draw the same chains: a chain's index, suffix seed and acceptance draw depend on its seed and
            step only. None (default): pipelined with length_cap="response" (suffix budgets differ, so
            lockstep would wait for the longest), lockstep with "suffix" (suffixes mostly run to the same
            cap; measured faster in lockstep on vLLM's CPU build).
        prefetch: with an engine, how many proposals each lockstep chain draws per engine call
            (pre-fetching, see the module docstring): those of its next `prefetch` steps on the branch
            where they are all rejected. The chains are those of 1 (off, the default); more tokens are
            drawn in fewer engine calls. Only worth trying for few chains (a narrow engine batch) at low
            acceptance rates; not combined with pipeline=True.
        (The options are declared with their ranges in `decoding.options.QAlignOptions`.)

    Example:
        >>> strategy = QAlign(reward=PositiveSentiment(), beta=0.5, steps=32)
        >>> out = AlignedModel(model, tokenizer=tok, strategy=strategy).generate(
        ...     **inputs, do_sample=True, max_new_tokens=64, return_dict_in_generate=True)
        >>> out.alignment["trace"]["acceptance_rate"]
    """

    name = "qalign"

    def __init__(
        self,
        reward,
        beta: float = QAlignOptions.beta,
        steps: int = QAlignOptions.steps,
        chains: int = QAlignOptions.chains,
        burn_in: int = QAlignOptions.burn_in,
        thin: int = QAlignOptions.thin,
        answer: str = QAlignOptions.answer,
        extract: Callable[[str], object] | None = None,
        reward_clamp: float | None = QAlignOptions.reward_clamp,
        log_ratio_clamp: float | None = QAlignOptions.log_ratio_clamp,
        length_cap: str = QAlignOptions.length_cap,
        reuse_prefix: bool = QAlignOptions.reuse_prefix,
        engine: SamplingEngine | None = None,
        backend: SamplingEngine | None = None,
        answer_kind: str = QAlignOptions.answer_kind,
        pipeline: bool | None = None,
        prefetch: int = 1,
    ):
        if reward is None:
            raise ValueError("QAlign needs a reward")
        self.options = QAlignOptions(beta=beta, steps=steps, chains=chains, burn_in=burn_in, thin=thin, answer=answer,
                                     answer_kind=answer_kind, length_cap=length_cap, reward_clamp=reward_clamp,
                                     log_ratio_clamp=log_ratio_clamp, reuse_prefix=reuse_prefix)
        if answer == "majority" and extract is None:
            from ..rewards.answers import extract_answer

            extract = partial(extract_answer, kind=answer_kind)
        o = self.options
        self.reward, self.beta, self.steps, self.chains = reward, o.beta, o.steps, o.chains
        self.burn_in, self.thin, self.answer, self.extract = o.burn_in, o.thin, o.answer, extract
        self.reward_clamp, self.log_ratio_clamp, self.length_cap = o.reward_clamp, o.log_ratio_clamp, o.length_cap
        self.reuse_prefix = o.reuse_prefix
        engine = engine_argument(engine, backend)
        if engine is not None and not isinstance(engine, SamplingEngine):
            raise TypeError(f"engine must be a SamplingEngine (e.g. VLLMEngine), got {type(engine).__name__}")
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 1:
            raise ValueError(f"prefetch (proposals a chain draws per engine call) must be an integer >= 1, got {prefetch!r}")
        if prefetch > 1:
            if engine is None:
                raise ValueError(f"prefetch={prefetch} needs an engine (engine=VLLMEngine(...)): in process each chain "
                                 "keeps one KV cache and draws one proposal a step")
            if pipeline:
                raise ValueError(f"prefetch={prefetch} draws lockstep chains' proposals ahead; it does not combine "
                                 "with pipeline=True")
            pipeline = False
        self.prefetch = prefetch
        if pipeline is None:
            # Measured on vLLM's CPU build (benchmarks/RESULTS.md, issue 20): pipelining gains where suffixes
            # end at different lengths (the response cap: budgets cap - i), and loses ~10% where they all run
            # to the same per-suffix cap (the official convention), where it only spreads prefills over steps.
            pipeline = self.length_cap == "response"
        self.engine, self.pipeline = engine, bool(pipeline)

    def hyperparameters(self) -> dict:
        out = {"beta": self.beta, "steps": self.steps, "chains": self.chains, "burn_in": self.burn_in,
               "thin": self.thin, "answer": self.answer, "reward": getattr(self.reward, "name", None),
               "reward_clamp": self.reward_clamp, "log_ratio_clamp": self.log_ratio_clamp,
               "length_cap": self.length_cap}
        if self.engine is not None:
            out["engine"] = self.engine.name
        if self.prefetch > 1:
            out["prefetch"] = self.prefetch
        return out

    # ------------------------------------------------------------------------------------ the chain
    def _score(self, policy, prompt_texts, prompt_ids, responses) -> torch.Tensor:
        r = score_completions(self.reward, policy.tokenizer, prompt_texts, responses, prompt_ids)
        return clamp_reward(r, self.reward_clamp)

    def _engine_draw(self, prefixes, budget, step_seeds, settings: GenerationSettings, device):
        """Every chain's suffix from the engine: prefix c (prompt + kept tokens) continued for at most
        budget[c] tokens, seeded as the in-process draw is. Returns (Decoded rows, the engine's counts)."""
        sampled = self.engine.generate(prefixes, budget, settings, derive_seeds(step_seeds, _SUFFIX))
        return sampled.decoded(settings.pad_id, device), sampled.forward_tokens, sampled.cached_tokens

    def run(self, policy, batch: PromptBatch, settings: GenerationSettings) -> Decoded:
        m = settings.num_return_sequences
        if self.answer == "last" and m > self.chains:
            raise ValueError(f"num_return_sequences={m} is more than the {self.chains} chain(s) per prompt")
        if self.answer != "last" and m > 1:
            raise ValueError(f"answer={self.answer!r} gives one answer per prompt; num_return_sequences={m}")
        if settings.max_new_tokens < 1:
            raise ValueError("QAlign needs max_new_tokens >= 1")
        settings = settings.with_fixed_seeds(batch.size)
        engine = self.engine
        width = policy.width() if engine is None else engine.vocab_size
        validate_ids(settings.stop_ids, width, "eos_token_id")
        rows = batch.size * self.chains
        chain_seeds = settings.row_seeds(batch.size, self.chains)
        needs_text = not hasattr(self.reward, "score_ids") or self.extract is not None
        prompt_texts = [t for t in batch.prompt_texts(policy.tokenizer) for _ in range(self.chains)] if needs_text else None
        prompt_ids = [p.tolist() for p in batch.token_lists() for _ in range(self.chains)]

        if engine is None:
            session, logits = policy.start(batch, width, repeats=self.chains)
            device = logits.device
        else:
            device = batch.input_ids.device
        cached_tokens = 0  # prefix tokens an engine's prefix cache served
        cap = settings.max_new_tokens

        def draw(session, logits, step_seeds, budget):
            suffix_rows = settings.sampling_rows(derive_seeds(step_seeds, _SUFFIX).to(device))
            # "park": finished rows leave the batch but keep their caches for the next step.
            return decode(session, logits, sampling=suffix_rows, max_new_tokens=budget, stop_ids=settings.stop_ids,
                          pad_id=settings.pad_id, prune_finished="park" if self.reuse_prefix else True,
                          progress=settings.progress)

        if engine is not None and self.pipeline:
            trace, sampled, forward_tokens, cached_tokens = self._pipelined(
                policy, settings, rows, chain_seeds, prompt_ids, prompt_texts)
            return self._finish(policy, trace, sampled, forward_tokens, cached_tokens, batch.size, m, settings,
                                device)

        if engine is not None and self.prefetch > 1:
            trace, sampled, forward_tokens, cached_tokens = self._prefetched(
                policy, settings, rows, chain_seeds, prompt_ids, prompt_texts, device)
            return self._finish(policy, trace, sampled, forward_tokens, cached_tokens, batch.size, m, settings,
                                device)

        # State 0: one ancestral sample per chain, recorded as accepted.
        if engine is None:
            first = draw(session, logits, derive_seeds(chain_seeds, 0), cap)
            forward_tokens = session.forward_tokens  # every token position run through the policy
        else:
            first, forward_tokens, cached_tokens = self._engine_draw(
                prompt_ids, torch.full((rows,), cap), derive_seeds(chain_seeds, 0), settings, device)
        state = [first.tokens[c, : int(first.lengths[c])].tolist() for c in range(rows)]
        state_lp = [first.logprobs[c, : int(first.lengths[c])].tolist() for c in range(rows)]
        sampled = first.total_sampled()  # every token drawn: state 0 and every proposal's suffix
        settings.report("chain step", 0, self.steps)
        reward = self._score(policy, prompt_texts, prompt_ids, state)
        trace = {"states": [list(state)], "state_logprobs": [list(state_lp)], "rewards": [reward.clone()],
                 "accepted": [torch.ones(rows, dtype=torch.bool)], "indices": [], "proposals": [],
                 "proposal_rewards": []}

        for k in range(1, self.steps + 1):
            step_seeds = derive_seeds(chain_seeds, k)
            n = torch.tensor([len(y) for y in state], dtype=torch.long)
            # Position to cut at, uniform on {0, ..., n-1}.
            cut = (row_uniform(step_seeds, _INDEX) * n).floor().long().clamp(max=n - 1)
            budget = ((cap - cut) if self.length_cap == "response" else torch.full_like(cut, cap)).to(device)
            if engine is not None:
                # prompt + y_<i as token ids: the engine's prefix cache holds the kept prefix.
                kept = [p + state[c][: int(cut[c])] for c, p in enumerate(prompt_ids)]
                suffix, used, hit = self._engine_draw(kept, budget, step_seeds, settings, device)
                forward_tokens, cached_tokens = forward_tokens + used, cached_tokens + hit
            elif self.reuse_prefix:
                # The proposal continues a copy of each chain's cache cut back to y_<i.
                trial = session.fork(torch.arange(rows, device=device))
                logits = trial.resume_at(trial.prompt_len + cut.to(device))
                suffix = draw(trial, logits, step_seeds, budget)
            else:
                kept = PromptBatch(*left_pad([p + state[c][: int(cut[c])] for c, p in enumerate(prompt_ids)],
                                             settings.pad_id, device))
                fresh, logits = policy.start(kept, width)
                suffix = draw(fresh, logits, step_seeds, budget)
                forward_tokens += fresh.forward_tokens
            sampled += suffix.total_sampled()
            proposal = [state[c][: int(cut[c])] + suffix.tokens[c, : int(suffix.lengths[c])].tolist() for c in range(rows)]
            r_new = self._score(policy, prompt_texts, prompt_ids, proposal)
            n_new = torch.tensor([len(y) for y in proposal], dtype=torch.long)
            log_a = acceptance_log_ratio(r_new, reward, n_new, n, self.beta, self.log_ratio_clamp)
            accept = torch.log(row_uniform(step_seeds, _ACCEPT)) < log_a
            if self.reuse_prefix and engine is None:
                forward_tokens += trial.forward_tokens
                session = ModelSession.merge_rows(session, trial, accept.to(device))
            for c in accept.nonzero().flatten().tolist():
                state[c] = proposal[c]
                state_lp[c] = state_lp[c][: int(cut[c])] + suffix.logprobs[c, : int(suffix.lengths[c])].tolist()
            reward = torch.where(accept, r_new, reward)
            trace["states"].append(list(state))
            trace["state_logprobs"].append(list(state_lp))
            trace["rewards"].append(reward.clone())
            trace["accepted"].append(accept)
            trace["indices"].append(cut)
            trace["proposals"].append(proposal)
            trace["proposal_rewards"].append(r_new)
            settings.report("chain step", k, self.steps)

        return self._finish(policy, trace, sampled, forward_tokens, cached_tokens if engine is not None else None,
                            batch.size, m, settings, device)

    def _finish(self, policy, trace, sampled, forward_tokens, cached_tokens, prompts, m, settings, device) -> Decoded:
        rewards = torch.stack(trace["rewards"])  # [steps + 1, rows]
        accepted = torch.stack(trace["accepted"])
        trace["rewards"], trace["accepted"] = rewards, accepted
        trace["acceptance_rate"] = accepted[1:].float().mean(0) if self.steps else torch.zeros(rewards.shape[1])
        trace["forward_tokens"] = forward_tokens
        if cached_tokens is not None:
            trace["cached_tokens"] = cached_tokens
        picks = self._final(policy, rewards, trace["states"], prompts, m)
        out = self._output(picks, trace, settings, device)
        out.sampled_tokens = sampled
        return out

    def _prefetched(self, policy, settings: GenerationSettings, rows, chain_seeds, prompt_ids, prompt_texts, device):
        """Lockstep chains with pre-fetched proposals (see the module docstring): each engine call draws, for
        every unfinished chain at step k, the proposals of steps k .. k+prefetch-1 from its current state;
        they are judged in step order and the first accepted one ends the chain's round. Each proposal's
        cut, suffix seed and acceptance draw are those of the lockstep path, so the chains are the same.
        Returns (trace lists, sampled tokens, forward tokens, cached tokens)."""
        engine, steps, cap = self.engine, self.steps, settings.max_new_tokens
        step_seeds = [derive_seeds(chain_seeds, k) for k in range(steps + 1)]
        suffix_seeds = [derive_seeds(s, _SUFFIX).tolist() for s in step_seeds]
        u_index = [None] + [row_uniform(step_seeds[k], _INDEX) for k in range(1, steps + 1)]
        log_u_accept = [None] + [torch.log(row_uniform(step_seeds[k], _ACCEPT)) for k in range(1, steps + 1)]

        # State 0: one ancestral sample per chain, as in the lockstep path.
        first, forward_tokens, cached_tokens = self._engine_draw(
            prompt_ids, torch.full((rows,), cap), step_seeds[0], settings, device)
        state = [first.tokens[c, : int(first.lengths[c])].tolist() for c in range(rows)]
        state_lp = [first.logprobs[c, : int(first.lengths[c])].tolist() for c in range(rows)]
        sampled = first.total_sampled()
        settings.report("chain step", 0, steps)
        reward = self._score(policy, prompt_texts, prompt_ids, state).clone()  # updated in place below
        states = [list(state)] + [[None] * rows for _ in range(steps)]
        states_lp = [list(state_lp)] + [[None] * rows for _ in range(steps)]
        rewards = torch.zeros(steps + 1, rows, dtype=reward.dtype)
        rewards[0] = reward
        accepted = torch.zeros(steps + 1, rows, dtype=torch.bool)
        accepted[0] = True
        cuts = torch.zeros(steps, rows, dtype=torch.long)
        proposals = [[None] * rows for _ in range(steps)]
        proposal_rewards = torch.zeros(steps, rows, dtype=reward.dtype)
        next_step = [1] * rows
        discarded, reported = 0, 0
        while True:
            requests = []  # (chain, step, cut), each chain's in step order
            prefixes, budgets, seeds = [], [], []
            for c in range(rows):
                n = torch.tensor([len(state[c])], dtype=torch.long)
                for k in range(next_step[c], min(next_step[c] + self.prefetch, steps + 1)):
                    # Uniform on {0..n-1}: the cut the chain makes at step k if it is still in this state.
                    cut = int((u_index[k][c:c + 1] * n).floor().long().clamp(max=n - 1))
                    requests.append((c, k, cut))
                    prefixes.append(prompt_ids[c] + state[c][:cut])
                    budgets.append(cap - cut if self.length_cap == "response" else cap)
                    seeds.append(suffix_seeds[k][c])
            if not requests:
                break
            out = engine.generate(prefixes, budgets, settings, seeds)
            drawn = out.decoded(settings.pad_id, device)
            forward_tokens, cached_tokens = forward_tokens + out.forward_tokens, cached_tokens + out.cached_tokens
            sampled += drawn.total_sampled()
            lengths = drawn.lengths.tolist()
            responses = [state[c][:cut] + drawn.tokens[i, : lengths[i]].tolist() for i, (c, _, cut) in enumerate(requests)]
            chains = [c for c, _, _ in requests]
            r = self._score(policy, None if prompt_texts is None else [prompt_texts[c] for c in chains],
                            [prompt_ids[c] for c in chains], responses)
            moved = set()  # chains that accepted a proposal in this call: their later ones are discarded
            for i, ((c, k, cut), response) in enumerate(zip(requests, responses)):
                if c in moved:
                    discarded += 1
                    continue
                cuts[k - 1, c] = cut
                proposals[k - 1][c] = response
                proposal_rewards[k - 1, c] = r[i]
                n_old = torch.tensor([len(state[c])], dtype=torch.long)
                n_new = torch.tensor([len(response)], dtype=torch.long)
                log_a = acceptance_log_ratio(r[i:i + 1], reward[c:c + 1], n_new, n_old, self.beta, self.log_ratio_clamp)
                if bool(log_u_accept[k][c:c + 1] < log_a):
                    accepted[k, c] = True
                    state[c] = response
                    state_lp[c] = state_lp[c][:cut] + drawn.logprobs[i, : lengths[i]].tolist()
                    reward[c] = r[i]
                    moved.add(c)
                states[k][c], states_lp[k][c], rewards[k, c] = state[c], state_lp[c], reward[c]
                next_step[c] = k + 1
            low = min(next_step) - 1
            if low > reported:
                reported = low
                settings.report("chain step", low, steps)
        trace = {"states": states, "state_logprobs": states_lp, "rewards": list(rewards),
                 "accepted": list(accepted), "indices": list(cuts), "proposals": proposals,
                 "proposal_rewards": list(proposal_rewards), "discarded_proposals": discarded}
        return trace, sampled, forward_tokens, cached_tokens

    def _pipelined(self, policy, settings: GenerationSettings, rows, chain_seeds, prompt_ids, prompt_texts):
        """Every chain on the engine's request queue: a chain's next proposal is submitted as soon as its
        last one has come back and been scored, so chains never wait for each other and the engine always
        has every unfinished chain in flight. Rewards are scored between engine steps for the chains that
        just returned, while the others keep generating. Each chain's cut, suffix seed and acceptance draw
        are those of the lockstep path (functions of the chain's seed and the step), so the chains, and
        their law, are the same. Returns (trace lists, sampled tokens, forward tokens, cached tokens)."""
        engine, steps, cap = self.engine, self.steps, settings.max_new_tokens
        step_seeds = [derive_seeds(chain_seeds, k) for k in range(steps + 1)]
        suffix_seeds = [derive_seeds(s, _SUFFIX).tolist() for s in step_seeds]
        u_index = [None] + [row_uniform(step_seeds[k], _INDEX) for k in range(1, steps + 1)]
        log_u_accept = [None] + [torch.log(row_uniform(step_seeds[k], _ACCEPT)) for k in range(1, steps + 1)]
        state: list[list[int]] = [[] for _ in range(rows)]
        state_lp: list[list[float]] = [[] for _ in range(rows)]
        reward = torch.zeros(rows)
        states = [[None] * rows for _ in range(steps + 1)]
        states_lp = [[None] * rows for _ in range(steps + 1)]
        rewards = torch.zeros(steps + 1, rows)
        accepted = torch.zeros(steps + 1, rows, dtype=torch.bool)
        accepted[0] = True
        cuts = torch.zeros(steps, rows, dtype=torch.long)
        proposals = [[None] * rows for _ in range(steps)]
        proposal_rewards = torch.zeros(steps, rows)
        done_steps = [-1] * rows
        counts = {"sampled": 0, "forward": 0, "cached": 0}

        def submit(c: int, k: int) -> None:
            if k == 0:
                cut, budget = 0, cap
            else:
                n = torch.tensor([len(state[c])], dtype=torch.long)
                cut = int((u_index[k][c:c + 1] * n).floor().long().clamp(max=n - 1))  # uniform on {0..n-1}
                budget = cap - cut if self.length_cap == "response" else cap
                cuts[k - 1, c] = cut
            engine.submit((c, k, cut), prompt_ids[c] + state[c][:cut], budget, settings, suffix_seeds[k][c])

        for c in range(rows):
            submit(c, 0)
        settings.report("chain step", 0, steps)
        reported = 0
        while engine.pending():
            finished = engine.poll()
            if not finished:
                continue
            keys = [f.key for f in finished]
            suffixes = [f.completions[0] for f in finished]
            responses = [state[c][:cut] + s.tokens for (c, _, cut), s in zip(keys, suffixes)]
            chains = [c for c, _, _ in keys]
            r = self._score(policy, None if prompt_texts is None else [prompt_texts[c] for c in chains],
                            [prompt_ids[c] for c in chains], responses)
            for j, ((c, k, cut), suffix, response) in enumerate(zip(keys, suffixes, responses)):
                counts["sampled"] += len(suffix.tokens)
                counts["forward"] += finished[j].forward_tokens
                counts["cached"] += finished[j].cached_tokens
                # The engine's log-probs as the lockstep path keeps them (float32, NaN when not reported).
                lp = torch.tensor(suffix.logprobs if suffix.logprobs is not None else [float("nan")] * len(suffix.tokens),
                                  dtype=torch.float32).tolist()
                if k == 0:
                    state[c], state_lp[c], reward[c] = response, lp, r[j]
                else:
                    proposals[k - 1][c] = response
                    proposal_rewards[k - 1, c] = r[j]
                    n_old = torch.tensor([len(state[c])], dtype=torch.long)
                    n_new = torch.tensor([len(response)], dtype=torch.long)
                    log_a = acceptance_log_ratio(r[j:j + 1], reward[c:c + 1], n_new, n_old, self.beta,
                                                 self.log_ratio_clamp)
                    if bool(log_u_accept[k][c:c + 1] < log_a):
                        accepted[k, c] = True
                        state[c], state_lp[c], reward[c] = response, state_lp[c][:cut] + lp, r[j]
                states[k][c], states_lp[k][c], rewards[k, c] = state[c], state_lp[c], reward[c]
                done_steps[c] = k
                if k < steps:
                    submit(c, k + 1)
            low = min(done_steps)
            if low > reported:
                reported = low
                settings.report("chain step", low, steps)
        trace = {"states": states, "state_logprobs": states_lp, "rewards": list(rewards),
                 "accepted": list(accepted), "indices": list(cuts), "proposals": proposals,
                 "proposal_rewards": list(proposal_rewards)}
        return trace, counts["sampled"], counts["forward"], counts["cached"]

    # ------------------------------------------------------------------------------- final answers
    def _kept_steps(self) -> list[int]:
        return [k for k in range(self.burn_in, self.steps + 1) if (k - self.burn_in) % self.thin == 0]

    def _final(self, policy, rewards, states, prompts: int, m: int) -> list[list[tuple[int, int]]]:
        """For each prompt, the (step, chain row) of each returned state."""
        if self.answer == "last":
            return [[(self.steps, b * self.chains + c) for c in range(m)] for b in range(prompts)]
        kept = self._kept_steps()
        picks = []
        for b in range(prompts):
            cands = [(k, b * self.chains + c) for c in range(self.chains) for k in kept]
            if self.answer == "best":
                # Highest reward; the earliest (chain, step) wins ties.
                best = max(range(len(cands)), key=lambda j: (float(rewards[cands[j]]), -j))
                picks.append([cands[best]])
                continue
            texts = policy.tokenizer.batch_decode([states[k][r] for k, r in cands], skip_special_tokens=True)
            answers = [self.extract(t) for t in texts]
            winner, _ = vote(answers)
            members = [j for j, a in enumerate(answers) if winner is not None and a == winner] or list(range(len(cands)))
            best = max(members, key=lambda j: (float(rewards[cands[j]]), -j))
            picks.append([cands[best]])
        return picks

    def _output(self, picks, trace, settings: GenerationSettings, device) -> Decoded:
        chosen = [p for per_prompt in picks for p in per_prompt]
        seqs = [trace["states"][k][r] for k, r in chosen]
        width = max((len(s) for s in seqs), default=0)
        tokens = torch.full((len(seqs), width), settings.pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(seqs), width)
        for i, (k, r) in enumerate(chosen):
            tokens[i, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            logprobs[i, : len(seqs[i])] = torch.tensor(trace["state_logprobs"][k][r])
        stops = set(settings.stop_ids)
        report = QAlignReport(
            trace=QAlignTrace(**trace, chains_per_prompt=self.chains),
            chosen=[[(k, r - b * self.chains) for k, r in per] for b, per in enumerate(picks)],
            rewards=torch.stack([trace["rewards"][k, r] for k, r in chosen]),
        )
        return Decoded(
            tokens=tokens.to(device),
            lengths=torch.tensor([len(s) for s in seqs], device=device),
            stopped=torch.tensor([bool(s) and s[-1] in stops for s in seqs], device=device),
            logprobs=logprobs.to(device),
            steps=self.steps,
            extras=report,
        )
