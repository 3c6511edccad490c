"""Step-level beam search and DVTS with a process reward (Snell et al. 2024; Hugging Face's search-and-learn
ships both).

Beam search, n beams, beam width M, per prompt:
  1. draw one step for each of the n beams (independent samples from the policy or a proposal);
  2. score every beam with the process reward; a path's score aggregates its step scores (last, min,
     product);
  3. beams that finished (a stop token, or the response budget) are set aside as completed; the search of
     a prompt ends when n beams completed or none is left;
  4. keep the n / M best unfinished beams (the earlier beam on ties) and extend each M ways;
  5. after max_steps rounds, unfinished beams count as completed. The answer is the completed beam with
     the highest aggregate score.
With M = 1 nothing is pruned: every beam runs to its end on its own, and the answer is the best of n
independent samples by the aggregate score, i.e. best-of-n.

DVTS (diverse verifier tree search, Beeching et al. 2024) splits the n beams into n / M independent
subtrees: each round a subtree keeps only the best of its M new steps and extends it M ways; a subtree
ends when its best path finished. The answer is the best subtree's path. Subtrees never compete before
the end, so the answers stay diverse where beam search collapses onto one prefix.

Random streams: slot j of a prompt draws from its own stream in every round (`step_search.round_seeds`);
ties never depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loop import Decoded
from .options import BeamSearchOptions, DVTSOptions
from .report import Report
from .step_search import Path, StepSearch, choose_best, paths_decoded, round_seeds, score_paths


@dataclass
class StepSearchReport(Report):
    """One call of a step-level search, per prompt."""

    candidates: list[list[list[int]]]  # [prompts][k] the completed paths' token ids
    scores: list[list[float]]  # [prompts][k] their aggregate scores
    step_scores: list[list[list[float]]]  # [prompts][k] every step's score
    chosen: list[list[int]]  # [prompts][returned] indices into candidates
    rounds: int  # search rounds run
    forward_tokens: int  # token positions run through the policy (or computed by an engine)
    reward_calls: int  # partial responses scored by the process reward
    sampled_tokens: int  # tokens drawn, kept or not


class StepBeamSearch(StepSearch):
    """Beam search over reasoning steps, ranked by a process reward (see the module docstring).

    Args:
        scorer: a ProcessReward (e.g. TransformersPRM), a value model from `train-value`, or a sequence
            reward applied to the partial responses.
        n: beams (the budget: n paths are extended each round).
        beam_width: M, each kept beam is extended M ways; n / M beams are kept.
        step_delimiter / step_tokens: where a step ends (a blank line by default; and / or every M tokens).
        max_steps: rounds of the search.
        aggregate: a path's score from its step scores: "last", "min" or "product".
        proposal: the token-level strategy that draws steps (plain sampling by default).
        engine: a SamplingEngine (e.g. VLLMEngine) drawing the steps (then no proposal).
        (The options are declared with their ranges in `decoding.options.BeamSearchOptions`.)

    Example:
        >>> search = StepBeamSearch(TransformersPRM.from_folder("/models/prm"), n=16, beam_width=4)
        >>> out = AlignedModel(model, tokenizer=tok, strategy=search).generate(**inputs, do_sample=True,
        ...                                                                    return_dict_in_generate=True)
        >>> out.alignment["scores"][0]   # prompt 0: every completed beam's score
    """

    name = "beam_search"
    options_class = BeamSearchOptions
    diverse = False

    def __init__(self, scorer, n: int = BeamSearchOptions.n, beam_width: int = BeamSearchOptions.beam_width, *,
                 step_delimiter: str | None = BeamSearchOptions.step_delimiter,
                 step_tokens: int | None = BeamSearchOptions.step_tokens,
                 max_steps: int = BeamSearchOptions.max_steps, aggregate: str = BeamSearchOptions.aggregate,
                 proposal=None, engine=None):
        super().__init__(scorer, proposal=proposal, engine=engine, n=n, beam_width=beam_width,
                         step_delimiter=step_delimiter, step_tokens=step_tokens, max_steps=max_steps,
                         aggregate=aggregate)

    def _next_round(self, scored: list[Path], completed: list[Path]) -> list[Path]:
        """Beam search's rule for one prompt: set finished beams aside, keep the n / M best unfinished ones
        and extend each M ways."""
        o = self.options
        completed += [p for p in scored if p.finished]
        active = [p for p in scored if not p.finished]
        if len(completed) >= o.n or not active:
            return []
        best = choose_best([p.score(o.aggregate) for p in active], max(1, o.n // o.beam_width))
        keep = [active[i] for i in sorted(best)]  # in their slots' order: ties keep going to the lower slot
        return [p for p in keep for _ in range(o.beam_width)]

    def search(self, frontier, boundary, batch, settings, tokenizer) -> Decoded:
        o, m = self.options, settings.num_return_sequences
        groups = o.n // o.beam_width if self.diverse else o.n
        if m > groups:
            raise ValueError(f"num_return_sequences={m} is more than the {groups} answers {self.name} gives "
                             f"(n={o.n}{f', beam_width={o.beam_width}' if self.diverse else ''})")
        slot_seeds = settings.row_seeds(batch.size, o.n)  # [B * n]
        population = frontier.start([o.n] * batch.size)
        completed: list[list[Path]] = [[] for _ in range(batch.size)]
        calls = rounds = 0
        for round_ in range(o.max_steps):
            if not frontier.live:
                break
            seeds = self._seeds(frontier.live, slot_seeds, o.n, round_)
            extended = self.extend(frontier, boundary, seeds, settings)
            score_paths(self.scorer, extended, batch, tokenizer, boundary)
            calls += len(extended)
            rounds += 1
            settings.report("search step", round_ + 1, o.max_steps)
            following = []
            for b in range(batch.size):
                mine = [p for p in population if p.prompt == b]
                following += self._next_round(mine, completed[b]) if mine else []
            if round_ == o.max_steps - 1:
                # Out of rounds: the paths that would go on complete as they are (each once).
                for p in {id(p): p for p in following}.values():
                    completed[p.prompt].append(p)
                break
            population = frontier.arrange(following)
        return self._answer(completed, frontier, settings, rounds, calls)

    def _seeds(self, live: list[Path], slot_seeds: torch.Tensor, n: int, round_: int) -> torch.Tensor:
        slots, seen = [], {}
        for p in live:
            j = seen.get(p.prompt, 0)
            seen[p.prompt] = j + 1
            slots.append(p.prompt * n + j)
        return round_seeds(slot_seeds[torch.tensor(slots, dtype=torch.long)], round_)

    def _answer(self, completed, frontier, settings, rounds: int, calls: int) -> Decoded:
        o, m = self.options, settings.num_return_sequences
        chosen, returned = [], []
        for b, paths in enumerate(completed):
            # Completed in the order of their first slot, whatever round they finished in: with nothing
            # pruned (beam_width 1) the answer is then best-of-n's, the first candidate winning ties.
            paths = completed[b] = sorted(paths, key=lambda p: p.origin)
            idx = choose_best([p.score(o.aggregate) for p in paths], m)
            chosen.append(idx)
            returned += [paths[i] for i in idx]
        report = StepSearchReport(
            candidates=[[p.tokens for p in paths] for paths in completed],
            scores=[[p.score(o.aggregate) for p in paths] for paths in completed],
            step_scores=[[list(p.scores) for p in paths] for paths in completed],
            chosen=chosen, rounds=rounds, forward_tokens=frontier.forward_tokens, reward_calls=calls,
            sampled_tokens=frontier.sampled,
        )
        device = frontier.batch.input_ids.device
        return paths_decoded(returned, settings.pad_id, device, rounds, report, frontier.sampled)


class DVTS(StepBeamSearch):
    """Diverse verifier tree search: n / M independent subtrees, each keeping the best of its M new steps
    every round (see the module docstring). Takes StepBeamSearch's arguments; n must be a multiple of
    beam_width (`decoding.options.DVTSOptions`).

    Example:
        >>> search = DVTS(prm, n=16, beam_width=4)      # 4 subtrees of width 4
    """

    name = "dvts"
    options_class = DVTSOptions
    diverse = True

    def _next_round(self, scored: list[Path], completed: list[Path]) -> list[Path]:
        """DVTS's rule for one prompt: each subtree (M consecutive live paths) keeps its best path; a
        subtree whose best path finished is done."""
        o, following = self.options, []
        for start in range(0, len(scored), o.beam_width):
            group = scored[start:start + o.beam_width]
            best = group[choose_best([p.score(o.aggregate) for p in group])[0]]
            if best.finished:
                completed.append(best)
            else:
                following += [best] * o.beam_width
        return following
