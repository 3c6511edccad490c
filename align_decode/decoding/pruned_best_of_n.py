"""Best-of-N that prunes weak candidates early (Speculative Rejection, Sun et al., NeurIPS 2024).

Plain best-of-N decodes all N candidates to the end and keeps the best. Most of them lose, and a
reward model can often tell early: at a schedule of token counts t_1 < t_2 < ... the surviving
candidates are scored on their partial responses, r(x, y_<=t_k), and only the best ceil(alpha * count)
go on (alpha = keep_fraction; the earlier candidate wins ties). The survivors are decoded to the end and
the answer is the one with the highest reward on the whole response, as best-of-N's.

Candidate j draws its tokens from the same random stream as best-of-N's candidate j (its row seed, token
t at step t), so with nothing pruned (alpha = 1, or no pruning point before the budget) it returns
exactly what `BestOfN` returns for the same seed; with pruning, the answer is one of the survivors and
never a pruned candidate. Pruning changes the law (the result is no longer the best of N i.i.d.
samples) and saves the pruned candidates' remaining tokens.

The paper grows the first batch until the accelerator's memory is full and rejects at that point; here
the schedule is explicit (`prune_at`, token counts) so that a run's compute is known beforehand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .candidates import check_sampling_source, score_completions
from .engine import SamplingEngine
from .loop import Decoded
from .options import PrunedBestOfNOptions
from .prompts import PromptBatch
from .report import Report
from .settings import GenerationSettings
from .step_search import Path, choose_best, make_frontier, paths_decoded, round_seeds
from .strategy import Strategy, TokenStrategy


@dataclass
class PrunedBestOfNReport(Report):
    """One call of early-pruned best-of-N, per prompt."""

    candidates: list[list[list[int]]]  # [prompts][n] each candidate's tokens (a pruned one's when pruned)
    rewards: list[list[float]]  # [prompts][n] the final reward of each survivor (NaN for pruned ones)
    pruned_at: list[list[int | None]]  # [prompts][n] the token count at which a candidate was pruned, or None
    partial_scores: list[list[list[float]]]  # [prompts][pruning points] the survivors' partial rewards there
    chosen: list[list[int]]  # [prompts][returned] candidate indices
    forward_tokens: int  # token positions run through the policy (or computed by an engine)
    reward_calls: int  # (partial) responses scored
    sampled_tokens: int  # tokens drawn, pruned candidates' included


class PrunedBestOfN(Strategy):
    """Best-of-N with candidates pruned at a schedule of token counts (see the module docstring).

    Args:
        reward: the sequence reward that picks the answer (text, or ids with `score_ids`).
        n: candidates per prompt at the start.
        prune_at: token counts at which candidates are scored and pruned (those at or past the response
            budget are ignored).
        keep_fraction: alpha, the share kept at each pruning point (1 keeps all: plain best-of-N).
        partial_reward: the reward scoring partial responses [the reward itself].
        proposal: the token-level strategy that draws candidates (plain sampling by default).
        engine: a SamplingEngine (e.g. VLLMEngine) drawing the candidates (then no proposal).
        (The options are declared with their ranges in `decoding.options.PrunedBestOfNOptions`.)

    Example:
        >>> strategy = PrunedBestOfN(SentimentReward(), n=32, prune_at=(16, 32), keep_fraction=0.25)
        >>> out = AlignedModel(model, tokenizer=tok, strategy=strategy).generate(**inputs, do_sample=True,
        ...                                                                      return_dict_in_generate=True)
        >>> out.alignment["pruned_at"][0]   # prompt 0: where each candidate was pruned (None: survived)
    """

    name = "pruned_best_of_n"

    def __init__(self, reward, n: int = PrunedBestOfNOptions.n,
                 prune_at: tuple[int, ...] | None = PrunedBestOfNOptions.prune_at,
                 keep_fraction: float = PrunedBestOfNOptions.keep_fraction, *, partial_reward=None,
                 proposal: TokenStrategy | None = None, engine: SamplingEngine | None = None):
        if reward is None:
            raise ValueError("pruned best-of-N needs a reward to pick its answer")
        self.options = PrunedBestOfNOptions(n=n, prune_at=tuple(prune_at or ()), keep_fraction=keep_fraction)
        check_sampling_source(proposal, engine)
        self.reward, self.partial_reward = reward, partial_reward or reward
        self.proposal, self.engine = proposal, engine

    def hyperparameters(self) -> dict:
        out = {**self.options.values(), "reward": getattr(self.reward, "name", None),
               "partial_reward": getattr(self.partial_reward, "name", None)}
        if self.proposal is not None:
            out["proposal"] = self.proposal.name
        if self.engine is not None:
            out["engine"] = self.engine.name
        return out

    def _score(self, reward, paths: list[Path], batch: PromptBatch, tokenizer) -> list[float]:
        if not paths:
            return []
        prompt_ids = [p.tolist() for p in batch.token_lists()]
        needs_text = not callable(getattr(reward, "score_ids", None))
        texts = batch.prompt_texts(tokenizer) if needs_text else None
        return score_completions(reward, tokenizer, None if texts is None else [texts[p.prompt] for p in paths],
                                 [p.tokens for p in paths], [prompt_ids[p.prompt] for p in paths]).tolist()

    def run(self, policy, batch: PromptBatch, settings: GenerationSettings) -> Decoded:
        o, m, cap = self.options, settings.num_return_sequences, settings.max_new_tokens
        if m > o.n:
            raise ValueError(f"num_return_sequences={m} is more than the n={o.n} candidates")
        settings = settings.with_fixed_seeds(batch.size)
        frontier = make_frontier(policy, batch, settings, self.proposal, self.engine)
        row_seeds = settings.row_seeds(batch.size, o.n)  # best-of-N's candidate seeds
        paths = frontier.start([o.n] * batch.size)
        survivors = [[(j, paths[b * o.n + j]) for j in range(o.n)] for b in range(batch.size)]
        final_paths: dict[tuple[int, int], Path] = {}
        pruned_at: list[list[int | None]] = [[None] * o.n for _ in range(batch.size)]
        partial_scores: list[list[list[float]]] = [[] for _ in range(batch.size)]
        calls = 0
        points = sorted({t for t in o.prune_at if t < cap}) + [cap]
        if o.keep_fraction == 1:
            points = [cap]  # nothing would be pruned: decode straight to the end
        for k, point in enumerate(points):
            live = frontier.live
            if live:
                index = {id(p): b * o.n + j for b, group in enumerate(survivors) for j, p in group}
                seeds = row_seeds[torch.tensor([index[id(p)] for p in live], dtype=torch.long)]
                if self.engine is not None:
                    seeds = round_seeds(seeds, k)  # an engine restarts its stream with every request
                offsets = torch.tensor([len(p.tokens) for p in live], dtype=torch.long)
                frontier.extend(seeds, point - offsets, None, offsets)
            settings.report("pruning point", k + 1, len(points))
            if point == cap:
                break
            sources = []
            for b, group in enumerate(survivors):
                scores = self._score(self.partial_reward, [p for _, p in group], batch, policy.tokenizer)
                calls += len(group)
                partial_scores[b].append(scores)
                keep = sorted(choose_best(scores, math.ceil(o.keep_fraction * len(group))))
                for i, (j, p) in enumerate(group):
                    if i not in keep:
                        pruned_at[b][j] = len(p.tokens)
                        final_paths[(b, j)] = p
                survivors[b] = [group[i] for i in keep]
                sources += [p for _, p in survivors[b]]
            arranged = iter(frontier.arrange(sources))
            survivors = [[(j, next(arranged)) for j, _ in group] for group in survivors]
        chosen, returned = [], []
        rewards = [[math.nan] * o.n for _ in range(batch.size)]
        for b, group in enumerate(survivors):
            scores = self._score(self.reward, [p for _, p in group], batch, policy.tokenizer)
            calls += len(group)
            for (j, p), s in zip(group, scores):
                rewards[b][j] = s
                final_paths[(b, j)] = p
            picked = choose_best(scores, m)
            chosen.append([group[i][0] for i in picked])
            returned += [group[i][1] for i in picked]
        report = PrunedBestOfNReport(
            candidates=[[final_paths[(b, j)].tokens for j in range(o.n)] for b in range(batch.size)],
            rewards=rewards, pruned_at=pruned_at, partial_scores=partial_scores, chosen=chosen,
            forward_tokens=frontier.forward_tokens, reward_calls=calls, sampled_tokens=frontier.sampled,
        )
        return paths_decoded(returned, settings.pad_id, batch.input_ids.device, len(points), report, frontier.sampled)
