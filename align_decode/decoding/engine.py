"""What a sampling engine is: an engine that continues token-id prefixes, many at once.

The sequence-level methods (best-of-N, QAlign, Transfer Q*'s rollouts) need from the policy only

    continuations  y ~ p(. | prefix)   of at most m tokens, ending at the first stop id,

for many prefixes at a time: a prompt (best-of-N, QAlign's state 0), a prompt plus a kept part of a
response (QAlign's suffix resampling), a prompt plus the response so far plus a candidate token
(Transfer Q*'s rollouts). An engine that does only this, with its own batching, KV-cache management and
parallelism, can carry that work; the methods' selection, acceptance and scoring stay here unchanged.

Seeding contract: prefix i's n continuations depend only on (seeds[i], the prefix, the settings), never
on the other prefixes of the call, so a prompt's result does not depend on its batch. Engines draw with
their own samplers: for one seed they give other tokens than the in-process loop, from the same law
(greedy decoding agrees token for token, up to floating-point ties).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from .loop import Decoded
from .settings import GenerationSettings


@dataclass(frozen=True)
class Completion:
    """One continuation of a prefix.

    tokens: the generated token ids, the stop token included when it stopped.
    stopped: it ended on a stop id (else it reached its token limit).
    logprobs: each token's log-prob as the engine reports it, or None when not requested.
    seed: the engine seed that drew it (None for greedy decoding); re-running the prefix alone with this
        seed and n = 1 draws the same tokens.
    """

    tokens: list[int]
    stopped: bool
    logprobs: list[float] | None = None
    seed: int | None = None


@dataclass
class EngineOutput:
    """The result of one `generate` call.

    completions: [prefix][draw], n draws per prefix, in the order the prefixes came in.
    forward_tokens: token positions the engine ran through the model, as it reports them: prompt tokens
        not served from its prefix cache, plus the generated tokens.
    cached_tokens: prompt tokens served from the engine's prefix cache.
    """

    completions: list[list[Completion]]
    forward_tokens: int = 0
    cached_tokens: int = 0

    def flat(self) -> list[Completion]:
        """Every completion, prefix-major (prefix 0's n draws, then prefix 1's, ...)."""
        return [c for per_prefix in self.completions for c in per_prefix]

    def decoded(self, pad_id: int, device=None) -> Decoded:
        """The completions as the decoding loop lays rows out (prefix-major). Log-probs the engine did not
        report are NaN (unknown), and 0 after each row's end as the loop's are."""
        rows = self.flat()
        width = max((len(c.tokens) for c in rows), default=0)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(rows), width)
        for i, c in enumerate(rows):
            n = len(c.tokens)
            tokens[i, :n] = torch.tensor(c.tokens, dtype=torch.long)
            logprobs[i, :n] = torch.tensor(c.logprobs if c.logprobs is not None else [math.nan] * n)
        return Decoded(
            tokens=tokens.to(device),
            lengths=torch.tensor([len(c.tokens) for c in rows], dtype=torch.long, device=device),
            stopped=torch.tensor([c.stopped for c in rows], dtype=torch.bool, device=device),
            logprobs=logprobs.to(device),
            steps=width,
            extras={"engine_forward_tokens": self.forward_tokens, "engine_cached_tokens": self.cached_tokens},
        )


def as_budgets(max_tokens: int | Sequence[int] | torch.Tensor, count: int) -> list[int]:
    """One token limit per prefix, each an integer >= 0."""
    if torch.is_tensor(max_tokens):
        max_tokens = max_tokens.tolist()
    budgets = [max_tokens] * count if isinstance(max_tokens, int) else [int(m) for m in max_tokens]
    if len(budgets) != count:
        raise ValueError(f"{len(budgets)} token limits for {count} prefixes")
    bad = [m for m in budgets if m < 0]
    if bad:
        raise ValueError(f"token limits must be >= 0, got {bad[:3]}")
    return budgets


def as_seeds(seeds: Sequence[int] | torch.Tensor, count: int) -> list[int]:
    if torch.is_tensor(seeds):
        seeds = seeds.flatten().tolist()
    seeds = [int(s) for s in seeds]
    if len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prefixes")
    return seeds


class SamplingEngine(ABC):
    """An engine that continues token-id prefixes (see the module docstring).

    Strategies that take `engine=` (BestOfN, QAlign, TransferQ) send their sampling here instead of
    running the in-process decoding loop; everything else they do is unchanged.
    """

    name: str = "engine"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Width of the served model's output head (token ids are in [0, vocab_size))."""

    @abstractmethod
    def generate(
        self,
        prefixes: Sequence[Sequence[int]],
        max_tokens: int | Sequence[int] | torch.Tensor,
        settings: GenerationSettings,
        seeds: Sequence[int] | torch.Tensor,
        n: int = 1,
    ) -> EngineOutput:
        """n continuations of each prefix (token ids), each of at most its max_tokens tokens (one limit,
        or one per prefix; 0 gives empty continuations) and ending at the first of settings.stop_ids,
        drawn as settings say (greedy, or temperature / top_k / top_p / min_p), prefix i from seeds[i]."""

    # ------------------------------------------------------------------ requests one at a time
    # `submit` / `poll` let a caller keep work in flight and react to each request as it completes
    # (QAlign's chains, best-of-N's scoring) instead of waiting for a whole `generate` call. Engines with a
    # request queue (VLLMEngine) override them; this default queues requests and runs them all in one
    # `generate` call at the next `poll`, so every engine supports them and draws the same tokens.
    # Do not mix: no `generate` call while submitted requests are pending.

    def submit(self, key, prefix: Sequence[int], max_tokens: int, settings: GenerationSettings, seed: int,
               n: int = 1, first_draw: int = 0) -> None:
        """Queue draws first_draw .. first_draw + n - 1 of one prefix (the draws a `generate` call with this seed
        and first_draw + n draws would give); `poll` returns them as a `Finished` with this key."""
        if not hasattr(self, "_request_queue"):
            self._request_queue = RequestQueue(self)
        self._request_queue.submit(key, prefix, max_tokens, settings, seed, n, first_draw)

    def pending(self) -> int:
        """Submitted requests not yet returned by `poll`."""
        queue = getattr(self, "_request_queue", None)
        return 0 if queue is None else queue.pending()

    def poll(self) -> list[Finished]:
        """Advance the engine and return the requests that completed (possibly none)."""
        queue = getattr(self, "_request_queue", None)
        return [] if queue is None else queue.poll()


@dataclass
class Finished:
    """A submitted request that has completed (see `SamplingEngine.submit`).

    key: what the caller gave `submit`.
    completions: its n draws, draw j of the request being draw first_draw + j of the prefix.
    forward_tokens, cached_tokens: as in EngineOutput, for this request alone.
    """

    key: object
    completions: list[Completion]
    forward_tokens: int = 0
    cached_tokens: int = 0


class RequestQueue:
    """The request API of an engine that has only `generate`: requests are queued, and one `poll` runs every
    queued request through one `generate` call (grouped by settings and draw counts). Callers see the same
    draws as with one `generate` call: `submit` / `poll` is then only a change of shape, not of speed."""

    def __init__(self, engine: "SamplingEngine"):
        self.engine = engine
        self.queued: list[tuple] = []

    def submit(self, key, prefix, max_tokens, settings, seed, n, first_draw) -> None:
        self.queued.append((key, list(prefix), int(max_tokens), settings, int(seed), n, first_draw))

    def pending(self) -> int:
        return len(self.queued)

    def poll(self) -> list[Finished]:
        queued, self.queued = self.queued, []
        groups: dict = {}
        for item in queued:
            groups.setdefault((id(item[3]), item[5] + item[6]), []).append(item)
        done = []
        for (_, draws), items in groups.items():
            out = self.engine.generate([i[1] for i in items], [i[2] for i in items], items[0][3], [i[4] for i in items],
                                       n=draws)
            for i, (item, comps) in enumerate(zip(items, out.completions)):
                # The call's counts go to its first request (they are not reported per prefix).
                done.append(Finished(item[0], comps[item[6]:], out.forward_tokens if i == 0 else 0,
                                     out.cached_tokens if i == 0 else 0))
        return done


def engine_argument(engine: "SamplingEngine | None", backend: "SamplingEngine | None") -> "SamplingEngine | None":
    """A strategy's `engine=`, or the old name `backend=` for one release (with a DeprecationWarning)."""
    if backend is None:
        return engine
    import warnings

    if engine is not None:
        raise ValueError("give engine= (backend= is its old name), not both")
    warnings.warn("backend= is now engine=; the old name goes in the next release", DeprecationWarning, stacklevel=3)
    return backend
