"""What step-level search shares: partial responses (paths), the model state that extends them one step
at a time, and scoring them with a process reward.

Beam search, DVTS, particle filtering and early-pruned best-of-N all repeat the same round:

  1. arrange the population: keep, drop or fork paths (a fork copies a path's KV cache rows);
  2. extend every unfinished path by one step (or up to a token count) through the one decoding loop;
  3. score the extended paths (a process reward on the partial responses);
  4. decide which paths go on (top-k, resampling, pruning): the method's own rule.

A `Frontier` does 1 and 2 in process (a `ModelSession` whose rows are the unfinished paths, never
recomputing a kept prefix: forks and drops are `select`s) or through a sampling engine (`EngineFrontier`:
each round resubmits prompt + path as token ids, the engine's prefix cache serving the shared part);
`score_paths` does 3. Finished paths (a stop token, or the response budget) hold no model state: they
are copied freely.

Random streams: `round_seeds` gives slot j of a prompt a fresh stream in every round, so two paths
forked from one parent draw independently, and a slot that holds another path in a later round never
reuses a draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from ..kernels import derive_seeds
from ..kernels.rows import row_uniform
from ..rewards.process import PartialResponse, PrefixReward, ProcessReward, ValuePRM, aggregate_scores
from .candidates import check_sampling_source
from .guides.base import GuideContext
from .loop import Decoded, decode
from .prompts import PromptBatch, left_pad
from .session import ModelSession
from .settings import GenerationSettings, validate_ids
from .steps import StepBoundary
from .strategy import Strategy


@dataclass
class Path:
    """One partial response under search."""

    prompt: int  # index of its prompt in the batch
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    step_ends: list[int] = field(default_factory=list)  # token count at the end of each step
    scores: list[float] = field(default_factory=list)  # the process reward after each step
    stopped: bool = False  # ended on a stop id
    finished: bool = False  # stopped, or reached the response budget
    origin: int = 0  # the slot its line started from in the first round (ties go to the lower one)

    def copy(self) -> "Path":
        return replace(self, tokens=list(self.tokens), logprobs=list(self.logprobs),
                       step_ends=list(self.step_ends), scores=list(self.scores))

    def truncated(self, steps: int) -> "Path":
        """This path as it was after its first `steps` steps (a particle Gibbs reference's ancestor)."""
        if steps >= len(self.step_ends):
            return self.copy()
        end = self.step_ends[steps - 1] if steps else 0
        return Path(self.prompt, self.tokens[:end], self.logprobs[:end], self.step_ends[:steps],
                    self.scores[:steps], origin=self.origin)

    def score(self, how: str) -> float:
        return aggregate_scores(self.scores, how)


def as_process_reward(scorer) -> ProcessReward:
    """A process reward from a ProcessReward, a value model (reads ids) or a sequence reward (on prefixes)."""
    if isinstance(scorer, ProcessReward):
        return scorer
    if callable(getattr(scorer, "score_ids", None)) and not callable(getattr(scorer, "score", None)):
        return ValuePRM(scorer)
    if callable(getattr(scorer, "score_ids", None)) or callable(getattr(scorer, "score", None)):
        return PrefixReward(scorer)
    raise TypeError(f"a process reward, a value model or a sequence reward is needed, got {type(scorer).__name__}")


def round_seeds(slot_seeds: torch.Tensor, round_: int) -> torch.Tensor:
    """Seeds of the slots' draws in one round: a child stream of each slot's seed per round."""
    return derive_seeds(slot_seeds, round_ + 1)


def seeded_uniforms(seed: int, count: int, salt: int) -> torch.Tensor:
    """`count` uniforms in [0, 1) from one seed: the random numbers of one resampling or selection."""
    base = derive_seeds(torch.tensor([int(seed)], dtype=torch.long), salt).expand(count)
    return row_uniform(base, torch.arange(count))


def choose_best(values: Sequence[float], m: int = 1) -> list[int]:
    """Indices of the m largest values; among equals the earlier index comes first."""
    order = torch.sort(-torch.tensor(values, dtype=torch.float64), stable=True).indices
    return order[:m].tolist()


class Frontier:
    """The unfinished paths' model state, in process: one ModelSession row per unfinished path (plus the
    proposal's guide states), extended one step at a time through `decode`."""

    def __init__(self, policy, batch: PromptBatch, settings: GenerationSettings, proposal=None):
        self.policy, self.batch, self.settings = policy, batch, settings
        self.guides, self.temperature, self.weights = _proposal_guides(proposal, settings)
        self.width = policy.width(self.guides)
        validate_ids(settings.stop_ids, self.width, "eos_token_id")
        validate_ids([settings.pad_id], self.width, "pad_token_id")
        self.tokenizer = policy.tokenizer
        self.live: list[Path] = []  # the unfinished paths, in session row order
        self._row: dict[int, int] = {}
        self.session = self.logits = None
        self.states: list = []
        self.sampled = 0
        self._spent = 0  # forward tokens of the sessions of earlier starts

    @property
    def device(self):
        return self.policy.device

    @property
    def forward_tokens(self) -> int:
        return self._spent + (0 if self.session is None else self.session.forward_tokens)

    def start(self, counts: Sequence[int]) -> list[Path]:
        """`counts[b]` empty paths for prompt b (prompt-major), prefilled once per prompt."""
        index = torch.tensor([b for b, c in enumerate(counts) for _ in range(c)], dtype=torch.long)
        self._spent = self.forward_tokens
        session = ModelSession(self.policy.model, vocab_size=self.width)
        logits = session.prefill(self.batch.input_ids.to(self.device), self.batch.attention_mask.to(self.device))
        session.select(index.to(self.device))
        self.session, self.logits = session, logits[index.to(self.device)]
        if self.guides:
            rows = self.batch.select(index)
            seeds = self.settings.row_seeds(self.batch.size, 1, self.device)[index.to(self.device)]
            context = GuideContext(rows, self.width, self.settings, seeds, self.tokenizer, session)
            self.states = [g.start(context) for g in self.guides]
        paths = _fresh_paths(counts)
        self._set_live(paths)
        return list(paths)

    def _set_live(self, paths: list[Path]) -> None:
        self.live = paths
        self._row = {id(p): i for i, p in enumerate(paths)}

    def _select(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.session.select(index)
        for s in self.states:
            s.select(index)
        self.logits = self.logits[index]

    def arrange(self, sources: Sequence[Path]) -> list[Path]:
        """Copies of these paths, in order (one listed twice is forked); the unfinished ones become the
        frontier's rows. Each unfinished source must be a current row, or a finished path's truncation
        (`adopt`ed first)."""
        copies = [p.copy() for p in sources]
        live = [(s, c) for s, c in zip(sources, copies) if not s.finished]
        missing = [s for s, _ in live if id(s) not in self._row]
        if missing:
            raise RuntimeError("a path to continue holds no model state (adopt it first)")
        self._select(torch.tensor([self._row[id(s)] for s, _ in live], dtype=torch.long))
        self._set_live([c for _, c in live])
        return copies

    def adopt(self, paths: Sequence[Path]) -> None:
        """Give unfinished paths made outside the frontier (a truncated reference particle) model state:
        their prompt and tokens are run once and their rows appended."""
        if not paths:
            return
        if self.states:
            raise ValueError("paths cannot be adopted while a proposal's guides run (particle Gibbs with a "
                             "guided proposal is not supported)")
        prompts = self.batch.token_lists()
        rows = [prompts[p.prompt].tolist() + p.tokens for p in paths]
        ids, mask = left_pad(rows, self.settings.pad_id, self.device)
        fresh = ModelSession(self.policy.model, vocab_size=self.width)
        logits = fresh.prefill(ids, mask)
        fresh.prompt_len = torch.tensor([len(prompts[p.prompt]) for p in paths], device=self.device)
        merged = ModelSession.concat([self.session, fresh])
        self.session.absorb(merged)
        self.logits = torch.cat([self.logits, logits])
        self._set_live(self.live + list(paths))

    def extend(self, seeds: torch.Tensor, limits: torch.Tensor, boundary: StepBoundary | None,
               offsets: torch.Tensor | int = 0) -> None:
        """Draw the next step (at most limits[i] tokens, ending at a step boundary or a stop id) of every
        unfinished path, with seeds[i] from step offsets[i]; update the paths; drop finished rows."""
        if not self.live:
            return
        s, device = self.settings, self.device
        w = torch.tensor(self.weights, dtype=torch.float32, device=device).expand(len(self.live), len(self.weights))
        out = decode(
            self.session, self.logits, self.states, w if self.guides else None,
            sampling=s.sampling_rows(seeds.to(device), self.temperature),
            max_new_tokens=limits.to(device), stop_ids=s.stop_ids, pad_id=s.pad_id,
            step_offset=torch.as_tensor(offsets, device=device), prune_finished=False,
            step_end=None if boundary is None or boundary.contains is None else boundary,
        )
        drawn = [out.tokens[r, : int(out.lengths[r])].tolist() for r in range(len(self.live))]
        logprobs = [out.logprobs[r, : len(d)].tolist() for r, d in enumerate(drawn)]
        self.sampled += out.total_sampled()
        self._record(drawn, logprobs, out.stopped.tolist())
        going = [i for i, p in enumerate(self.live) if not p.finished]
        keep = torch.tensor(going, dtype=torch.long)
        kept = [self.live[i] for i in going]
        if not kept:
            self._set_live([])
            return
        # The kept rows hold every token of their step but the last one drawn: feed it.
        self._select(keep)
        last = torch.tensor([drawn[i][-1] for i in going], dtype=torch.long, device=device)
        self.logits = self.session.step(last)
        for st in self.states:
            st.advance(last)
        self.session.maybe_compact()
        self._set_live(kept)

    def _record(self, drawn, logprobs, stopped) -> None:
        cap = self.settings.max_new_tokens
        for p, d, lp, st in zip(self.live, drawn, logprobs, stopped):
            p.tokens += d
            p.logprobs += lp
            p.step_ends.append(len(p.tokens))
            p.stopped = bool(st)
            p.finished = p.stopped or len(p.tokens) >= cap or not d


class EngineFrontier(Frontier):
    """The same frontier on a sampling engine: each round submits every unfinished path's prompt + tokens
    with its token limit; the step delimiter's single-token forms are extra stop ids (a delimiter split
    over two tokens is not seen: set step_tokens to bound a step whatever the text)."""

    def __init__(self, engine, batch: PromptBatch, settings: GenerationSettings, tokenizer=None):
        self.engine, self.batch, self.settings, self.tokenizer = engine, batch, settings, tokenizer
        self.width = engine.vocab_size
        validate_ids(settings.stop_ids, self.width, "eos_token_id")
        self.live, self._row, self.sampled = [], {}, 0
        self._forward, self.cached_tokens = 0, 0
        self._prompts = [p.tolist() for p in batch.token_lists()]

    @property
    def forward_tokens(self) -> int:
        return self._forward

    def start(self, counts: Sequence[int]) -> list[Path]:
        paths = _fresh_paths(counts)
        self._set_live(paths)
        return list(paths)

    def arrange(self, sources: Sequence[Path]) -> list[Path]:
        copies = [p.copy() for p in sources]
        self._set_live([c for c in copies if not c.finished])
        return copies

    def adopt(self, paths: Sequence[Path]) -> None:
        self._set_live(self.live + list(paths))

    def extend(self, seeds, limits, boundary, offsets=0) -> None:
        if not self.live:
            return
        s = self.settings
        extra = [] if boundary is None else boundary.stop_ids()
        step_settings = replace(s, stop_ids=tuple(s.stop_ids) + tuple(i for i in extra if i not in s.stop_ids))
        prefixes = [self._prompts[p.prompt] + p.tokens for p in self.live]
        out = self.engine.generate(prefixes, limits, step_settings, seeds)
        self._forward += out.forward_tokens
        self.cached_tokens += out.cached_tokens
        done = out.flat()
        drawn = [c.tokens for c in done]
        self.sampled += sum(len(d) for d in drawn)
        stops = set(s.stop_ids)
        logprobs = [c.logprobs if c.logprobs is not None else [float("nan")] * len(c.tokens) for c in done]
        self._record(drawn, logprobs, [c.stopped and bool(c.tokens) and c.tokens[-1] in stops for c in done])
        self._set_live([p for p in self.live if not p.finished])


def _fresh_paths(counts: Sequence[int]) -> list[Path]:
    return [Path(b, origin=j) for b, c in enumerate(counts) for j in range(c)]


def make_frontier(policy, batch, settings, proposal=None, engine=None) -> Frontier:
    if engine is None:
        return Frontier(policy, batch, settings, proposal)
    return EngineFrontier(engine, batch, settings, policy.tokenizer)


def _proposal_guides(proposal, settings: GenerationSettings):
    """(guides, policy temperature, weights) of a token-level proposal; plain sampling without one."""
    if proposal is None:
        return [], settings.temperature, []
    guides = list(proposal.guides())
    temperature, weights = proposal.mixing(settings)
    kept = [i for i, w in enumerate(weights) if w != 0]
    return [guides[i] for i in kept], temperature, [weights[i] for i in kept]


def score_paths(scorer: ProcessReward, paths: Sequence[Path], batch: PromptBatch, tokenizer,
                boundary: StepBoundary | None) -> None:
    """Append the process reward of each path's newest step to its scores (one call for all of them)."""
    if not paths:
        return
    prompt_ids = [p.tolist() for p in batch.token_lists()]
    texts = batch.prompt_texts(tokenizer) if tokenizer is not None or batch.texts is not None else None
    responses = []
    for p in paths:
        steps = _split(p.tokens, p.step_ends)
        if tokenizer is None:  # only scorers that read ids can score these
            prompt, step_texts, whole = None, [None] * len(steps), None
        else:
            prompt = texts[p.prompt]
            step_texts = tokenizer.batch_decode(steps, skip_special_tokens=True)
            whole = tokenizer.decode(p.tokens, skip_special_tokens=True)
        responses.append(PartialResponse(prompt, tuple(step_texts), tuple(prompt_ids[p.prompt]),
                                         tuple(tuple(s) for s in steps), whole))
    for p, s in zip(paths, scorer.score_partial(responses).tolist()):
        p.scores.append(float(s))


def _split(tokens: list[int], ends: list[int]) -> list[list[int]]:
    out, start = [], 0
    for end in ends:
        out.append(tokens[start:end])
        start = end
    return out


def paths_decoded(paths: Sequence[Path], pad_id: int, device, steps: int, extras, sampled: int) -> Decoded:
    """The returned paths as the loop's output rows."""
    width = max((len(p.tokens) for p in paths), default=0)
    tokens = torch.full((len(paths), width), pad_id, dtype=torch.long)
    logprobs = torch.zeros(len(paths), width)
    for i, p in enumerate(paths):
        tokens[i, : len(p.tokens)] = torch.tensor(p.tokens, dtype=torch.long)
        logprobs[i, : len(p.tokens)] = torch.tensor(p.logprobs, dtype=torch.float32)
    return Decoded(
        tokens=tokens.to(device),
        lengths=torch.tensor([len(p.tokens) for p in paths], dtype=torch.long, device=device),
        stopped=torch.tensor([p.stopped for p in paths], dtype=torch.bool, device=device),
        logprobs=logprobs.to(device),
        steps=steps,
        extras=extras,
        sampled_tokens=sampled,
    )


class StepSearch(Strategy):
    """Base of the step-level searches: a process reward, where steps end, the proposal that draws them
    and where sampling runs. Subclasses implement `search`."""

    options_class: type = None  # its declared options (decoding.options)

    def __init__(self, scorer, *, proposal=None, engine=None, **options):
        if scorer is None:
            raise ValueError(f"{self.name} needs a process reward (a PRM, a value model or a sequence reward on "
                             "prefixes) to score partial responses")
        self.scorer = as_process_reward(scorer)
        self.options = self.options_class(**options)
        check_sampling_source(proposal, engine)
        self.proposal, self.engine = proposal, engine

    def hyperparameters(self) -> dict:
        out = {**self.options.values(), "scorer": self.scorer.name}
        if self.proposal is not None:
            out["proposal"] = self.proposal.name
        if self.engine is not None:
            out["engine"] = self.engine.name
        return out

    def boundary(self, width: int, tokenizer) -> StepBoundary:
        o = self.options
        return StepBoundary.build(tokenizer, o.step_delimiter, o.step_tokens, width=width)

    def run(self, policy, batch: PromptBatch, settings: GenerationSettings) -> Decoded:
        settings = settings.with_fixed_seeds(batch.size)
        frontier = make_frontier(policy, batch, settings, self.proposal, self.engine)
        tokenizer = policy.tokenizer
        boundary = self.boundary(frontier.width, tokenizer)
        return self.search(frontier, boundary, batch, settings, tokenizer)

    def search(self, frontier: Frontier, boundary: StepBoundary, batch: PromptBatch, settings: GenerationSettings,
               tokenizer) -> Decoded:
        raise NotImplementedError

    def extend(self, frontier: Frontier, boundary: StepBoundary, seeds: torch.Tensor, settings) -> list[Path]:
        """One step of every unfinished path; returns the paths that drew it."""
        paths = list(frontier.live)
        if paths:
            remaining = torch.tensor([settings.max_new_tokens - len(p.tokens) for p in paths], dtype=torch.long)
            frontier.extend(seeds, boundary.limit(remaining), boundary)
        return paths
