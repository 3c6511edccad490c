"""Best-of-N and the vote aggregations over one pool of N samples per prompt.

Draw y_1..y_N i.i.d. from the policy (or any token-level proposal), score r(x, y_i), then

- best:              return argmax_i r(x, y_i) (the first index wins ties);
- majority:          return the most frequent extracted answer (the first seen wins ties);
- weighted_majority: weight sample i by softmax(r / beta)_i, sum the weights per answer, return the heaviest.

The law of best-of-N for a discrete policy p is, with F(u) = P(r(Y) <= u) and F-(u) = P(r(Y) < u):
P(y) = p(y) / p(r(Y) = r(y)) * (F(r(y))^N - F-(r(y))^N). N = 1 is p itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch

from .engine import SamplingEngine, engine_argument
from .candidates import (check_sampling_source, completion_ids, engine_scored_candidates, sample_candidates,
                         score_completions)
from .loop import Decoded
from .options import BestOfNOptions
from .report import Report
from .prompts import PromptBatch
from .settings import GenerationSettings
from .strategy import Sample, Strategy, TokenStrategy



@dataclass
class BestOfNReport(Report):
    """One call of best-of-N, per prompt: every candidate, which were returned, their rewards and votes."""

    candidates: list[list[list[int]]]  # [prompts][n] each candidate's generated token ids
    chosen: list[list[int]]  # [prompts][returned] index of each returned candidate among the n
    rewards: torch.Tensor | None  # [prompts, n]; None for an unweighted vote without a reward
    forward_tokens: int | None = None  # token positions an engine computed (None in process: not counted)
    seeds: list[list[int]] | None = None  # [prompts][n] each candidate's engine seed
    answers: list[list] | None = None  # [prompts][n] extracted answers (votes only)
    voted: list | None = None  # [prompts] the winning answer (votes only)


def vote(answers: list, weights: list[float] | None = None):
    """The answer with the largest total weight (count when unweighted); None answers do not vote;
    ties go to the answer seen first. Returns (answer or None, its total)."""
    totals: dict = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        totals[a] = totals.get(a, 0.0) + (1.0 if weights is None else weights[i])
    if not totals:
        return None, 0.0
    best = max(totals.values())
    winner = next(a for a in totals if totals[a] == best)  # dicts keep first-seen order
    return winner, best


class BestOfN(Strategy):
    """Sample N candidates per prompt and keep the best by a sequence reward (or vote on answers).

    Args:
        reward: a SequenceReward (text) or any object with `score_ids`; required for best and
            weighted_majority, optional for majority.
        n: candidates per prompt, >= 1.
        aggregate: "best", "majority" or "weighted_majority".
        beta: temperature of the weighted vote's softmax(r / beta), > 0.
        extract: text -> answer (or None) for the votes [extract_answer of answer_kind].
        answer_kind: what a vote compares when no extract is given: the final number, the \\boxed{}
            answer or the option letter (`align_decode.rewards.extract_answer`).
        proposal: the token-level strategy that draws candidates (plain sampling by default; a GenARM
            proposal gives guided candidates).
        max_rows: most rows decoded at once, so a large n never runs out of memory.
        engine: a SamplingEngine (e.g. VLLMEngine) that draws the candidates: one request per prompt
            with n draws (the engine's own n-sampling: the prompt is prefilled once), all prompts in flight
            together, each prompt's candidates scored as soon as they complete while the others still
            generate (max_rows then does not apply); None decodes in process. It samples the policy itself,
            so it does not combine with a proposal.
        max_in_flight: with an engine, most candidates submitted and not yet returned: a larger n is drawn
            in requests of at most this many draws, each submitted as earlier ones complete (the same
            candidates: draw offsets keep their seeds).
        (The options are declared with their ranges in `decoding.options.BestOfNOptions`.)

    Example:
        >>> strategy = BestOfN(reward=PositiveSentiment(), n=16)
        >>> out = AlignedModel(model, tokenizer=tok, strategy=strategy).generate(**inputs, do_sample=True,
        ...                                                                      return_dict_in_generate=True)
        >>> out.alignment["rewards"]   # [prompts, n]: every candidate's reward
    """

    name = "best_of_n"

    def __init__(
        self,
        reward=None,
        n: int = BestOfNOptions.n,
        aggregate: str = BestOfNOptions.aggregate,
        beta: float = BestOfNOptions.beta,
        extract: Callable[[str], object] | None = None,
        proposal: TokenStrategy | None = None,
        max_rows: int = BestOfNOptions.max_rows,
        engine: SamplingEngine | None = None,
        backend: SamplingEngine | None = None,
        answer_kind: str = BestOfNOptions.answer_kind,
        max_in_flight: int = 1024,
    ):
        o = self.options = BestOfNOptions(n=n, aggregate=aggregate, beta=beta, answer_kind=answer_kind,
                                          max_rows=max_rows)
        if reward is None and aggregate != "majority":
            raise ValueError(f"aggregate={aggregate!r} needs a reward")
        if aggregate != "best" and extract is None:
            from ..rewards.answers import extract_answer

            extract = partial(extract_answer, kind=answer_kind)
        engine = engine_argument(engine, backend)
        check_sampling_source(proposal, engine)
        self.reward, self.n, self.aggregate, self.beta = reward, o.n, o.aggregate, o.beta
        self.extract, self.proposal, self.max_rows = extract, proposal or Sample(), o.max_rows
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        self.engine, self.max_in_flight = engine, max_in_flight

    def hyperparameters(self) -> dict:
        out = {"n": self.n, "aggregate": self.aggregate, "beta": self.beta, "max_rows": self.max_rows,
               "reward": getattr(self.reward, "name", None), "proposal": self.proposal.name}
        if self.engine is not None:
            out["engine"] = self.engine.name
        return out

    def _choose(self, rewards: torch.Tensor | None, answers: list | None, m: int) -> tuple[list[int], object]:
        """Indices (into the n candidates) of the m returned rows, and the voted answer."""
        if self.aggregate == "best":
            # Stable sort: among equal rewards the earlier candidate comes first.
            order = torch.sort(-rewards, stable=True).indices
            return order[:m].tolist(), None
        weights = None
        if self.aggregate == "weighted_majority":
            weights = torch.softmax(rewards.double() / self.beta, -1).tolist()
        winner, _ = vote(answers, weights)
        members = [i for i, a in enumerate(answers) if a == winner and winner is not None]
        if not members:
            members = list(range(len(answers)))
        if rewards is not None and self.aggregate == "weighted_majority":
            members = sorted(members, key=lambda i: (-float(rewards[i]), i))
        return members[:1], winner

    def run(self, policy, batch: PromptBatch, settings: GenerationSettings) -> Decoded:
        m = settings.num_return_sequences
        if m > self.n:
            raise ValueError(f"num_return_sequences={m} is more than the n={self.n} candidates")
        if m > 1 and self.aggregate != "best":
            raise ValueError(f"aggregate={self.aggregate!r} returns one answer per prompt; num_return_sequences={m}")
        texts = None
        prompt_texts = [t for t in batch.prompt_texts(policy.tokenizer) for _ in range(self.n)] \
            if (self.reward is not None and not hasattr(self.reward, "score_ids")) or self.extract else None
        prompt_ids = [p.tolist() for p in batch.token_lists() for _ in range(self.n)]
        rewards = None
        if self.engine is None:
            cands = sample_candidates(self.proposal, policy, batch, replace(settings, num_return_sequences=1),
                                      self.n, self.max_rows)
            ids = completion_ids(cands)
            if self.reward is not None:
                rewards = score_completions(self.reward, policy.tokenizer, prompt_texts, ids,
                                            prompt_ids).view(batch.size, self.n)
        else:
            def score(prompts: list[int], cands: list[list[list[int]]]) -> torch.Tensor:
                rows = [b * self.n + j for b in prompts for j in range(self.n)]
                return score_completions(self.reward, policy.tokenizer,
                                         None if prompt_texts is None else [prompt_texts[r] for r in rows],
                                         [c for per in cands for c in per],
                                         [prompt_ids[r] for r in rows]).view(len(prompts), self.n)

            # Each prompt's candidates are scored as its request completes, while the others generate.
            cands, rewards = engine_scored_candidates(self.engine, batch, settings, self.n,
                                                      None if self.reward is None else score, self.max_in_flight)
            ids = completion_ids(cands)
        answers = None
        if self.extract is not None:
            texts = policy.tokenizer.batch_decode(ids, skip_special_tokens=True)
            answers = [self.extract(t) for t in texts]
        picked, voted = [], []
        for b in range(batch.size):
            r = None if rewards is None else rewards[b]
            a = None if answers is None else answers[b * self.n:(b + 1) * self.n]
            idx, winner = self._choose(r, a, m)
            picked += [b * self.n + i for i in idx]
            voted.append(winner)
        index = torch.tensor(picked, device=cands.tokens.device)
        width = int(cands.lengths[index].max()) if len(picked) else 0
        report = BestOfNReport(
            candidates=[ids[b * self.n:(b + 1) * self.n] for b in range(batch.size)],
            chosen=[[i - b * self.n for i in picked[b * m:(b + 1) * m]] for b in range(batch.size)],
            rewards=rewards,
            forward_tokens=cands.extras.get("engine_forward_tokens"),
            seeds=cands.extras.get("seeds"),
            answers=None if answers is None else [answers[b * self.n:(b + 1) * self.n] for b in range(batch.size)],
            voted=None if answers is None else voted,
        )
        return Decoded(
            tokens=cands.tokens[index, :width],
            lengths=cands.lengths[index],
            stopped=cands.stopped[index],
            logprobs=cands.logprobs[index, :width],
            steps=cands.steps,
            extras=report,
            sampled_tokens=cands.total_sampled(),
        )
