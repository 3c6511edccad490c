"""Pieces the sequence-level methods share: drawing many candidates per prompt in memory-bounded chunks
(or from a sampling engine), reading completions out of the loop's output, and scoring them with a
sequence reward."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .engine import SamplingEngine
from .loop import Decoded
from .prompts import PromptBatch
from .settings import GenerationSettings
from .strategy import TokenStrategy


def check_sampling_source(proposal, engine) -> None:
    """A sequence method samples from a token-level proposal in process, or from a sampling engine (which
    samples the policy itself), not both."""
    if proposal is not None and not isinstance(proposal, TokenStrategy):
        raise TypeError("proposal must be a token-level strategy (Sample, GenARM, ...)")
    if engine is not None and not isinstance(engine, SamplingEngine):
        raise TypeError(f"engine must be a SamplingEngine (e.g. VLLMEngine), got {type(engine).__name__}")
    if engine is not None and proposal is not None:
        raise ValueError(f"an engine samples the policy itself; proposal={proposal.name!r} runs in process only")


def completion_ids(decoded: Decoded, rows: Sequence[int] | None = None) -> list[list[int]]:
    """Each row's generated tokens, up to and including its stop token."""
    rows = range(decoded.tokens.shape[0]) if rows is None else rows
    return [decoded.tokens[r, : int(decoded.lengths[r])].tolist() for r in rows]


def _checked(values, count: int, name: str) -> torch.Tensor:
    out = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if out.shape != (count,):
        raise ValueError(f"reward {name!r} returned shape {tuple(out.shape)} for {count} pairs; expected ({count},)")
    if bool(torch.isnan(out).any()):
        raise ValueError(f"reward {name!r} returned NaN for pair(s) {torch.isnan(out).nonzero().flatten().tolist()}")
    return out


def score_completions(
    reward,
    tokenizer,
    prompt_texts: Sequence[str],
    completions: Sequence[Sequence[int]],
    prompt_ids: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Rewards [N] for completions (token ids) of the given prompts.

    A reward that reads token ids (it has `score_ids(prompt_ids, completion_ids)`) gets ids; any other
    reward gets text, decoded without special tokens (so a stop token is not part of the text)."""
    name = getattr(reward, "name", type(reward).__name__)
    score_ids = getattr(reward, "score_ids", None)
    if callable(score_ids):
        if prompt_ids is None:
            raise ValueError(f"reward {name!r} scores token ids but no prompt ids were given")
        return _checked(score_ids(list(prompt_ids), [list(c) for c in completions]), len(completions), name)
    if tokenizer is None:
        raise ValueError(f"reward {name!r} reads text: the policy's tokenizer is needed to decode completions")
    texts = tokenizer.batch_decode([list(c) for c in completions], skip_special_tokens=True)
    return _checked(reward.score(list(prompt_texts), texts), len(completions), name)


def concat_decoded(parts: Sequence[Decoded], pad_id: int) -> Decoded:
    """Rows of several loop outputs stacked in order (tokens padded to the widest)."""
    width = max(p.tokens.shape[1] for p in parts)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Decoded(
        tokens=torch.cat([pad(p.tokens, pad_id) for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        stopped=torch.cat([p.stopped for p in parts]),
        logprobs=torch.cat([pad(p.logprobs, 0.0) for p in parts]),
        steps=sum(p.steps for p in parts),
        sampled_tokens=sum(p.total_sampled() for p in parts),
    )


def _chunks(prompts: int, n: int, max_rows: int):
    """(first prompt, prompt count, first candidate, candidate count) blocks of at most max_rows rows,
    in prompt-major order."""
    if n <= max_rows:
        per = max(1, max_rows // n)
        for p0 in range(0, prompts, per):
            yield p0, min(per, prompts - p0), 0, n
    else:
        for p0 in range(prompts):
            for c0 in range(0, n, max_rows):
                yield p0, 1, c0, min(max_rows, n - c0)


def sample_candidates(
    proposal,
    policy,
    batch: PromptBatch,
    settings: GenerationSettings,
    n: int,
    max_rows: int,
) -> Decoded:
    """n samples per prompt from a token-level strategy, prompt-major ([B * n] rows), at most max_rows
    rows per forward pass. A candidate's draws depend on its prompt's seed and its index only, so the
    chunking never changes what is drawn."""
    if n < 1:
        raise ValueError(f"the number of candidates must be >= 1, got {n}")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    settings = settings.with_fixed_seeds(batch.size)
    parts, drawn = [], 0
    settings.report("candidates", 0, batch.size * n)
    for p0, pc, c0, cc in _chunks(batch.size, n, max_rows):
        index = torch.arange(p0, p0 + pc)
        sub = replace(settings, num_return_sequences=cc, row_offset=c0, seeds=settings.seeds[index],
                      output_scores=False, streamer=None)
        parts.append(proposal.run(policy, batch.select(index), sub))
        drawn += pc * cc
        settings.report("candidates", drawn, batch.size * n)
    return concat_decoded(parts, settings.pad_id)


def engine_candidates(engine, batch: PromptBatch, settings: GenerationSettings, n: int) -> Decoded:
    """n samples per prompt from a sampling engine, prompt-major ([B * n] rows): one request per prompt
    drawing n (the engine's own n-sampling, which shares the prompt's prefill). The request's seed is the
    prompt's first row seed (`settings.row_seeds`), so a prompt's candidates depend on its seed alone;
    each candidate's engine seed is in extras["seeds"] ([B][n])."""
    if n < 1:
        raise ValueError(f"the number of candidates must be >= 1, got {n}")
    settings = settings.with_fixed_seeds(batch.size)
    prompts = [p.tolist() for p in batch.token_lists()]
    sampled = engine.generate(prompts, settings.max_new_tokens, settings, settings.row_seeds(batch.size, 1), n=n)
    out = sampled.decoded(settings.pad_id, device=batch.input_ids.device)
    out.extras["seeds"] = [[c.seed for c in per_prompt] for per_prompt in sampled.completions]
    return out


def engine_scored_candidates(engine, batch: PromptBatch, settings: GenerationSettings, n: int, score=None,
                             max_in_flight: int = 1024):
    """`engine_candidates`'s candidates (the same draws, the same seeds), with each prompt's candidates scored
    as soon as its last one completes while the other prompts are still generating.

    Requests go through the engine's request API (`submit` / `poll`): one request per prompt with n draws
    (the prompt prefilled once for them), or, when n is more than max_in_flight, requests of at most
    max_in_flight draws (draw offsets keep every candidate's seed), submitted as earlier ones complete so that
    at most max_in_flight candidates are in flight at once whatever n is.

    score(prompt indices, their candidates as [prompts][n] token lists) -> rewards [len(prompts), n], or None
    for no scoring. Returns (Decoded [B * n] prompt-major, rewards [B, n] or None)."""
    if n < 1:
        raise ValueError(f"the number of candidates must be >= 1, got {n}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
    settings = settings.with_fixed_seeds(batch.size)
    prompts = [p.tolist() for p in batch.token_lists()]
    seeds = settings.row_seeds(batch.size, 1).tolist()
    per = min(n, max_in_flight)
    todo = [(b, c0, min(per, n - c0)) for b in range(batch.size) for c0 in range(0, n, per)]
    todo.reverse()  # popped from the end: prompt-major order
    got: list[list] = [[None] * n for _ in range(batch.size)]
    missing = [n] * batch.size
    rewards = None if score is None else torch.zeros(batch.size, n)
    forward = cached = flying = drawn = 0
    settings.report("candidates", 0, batch.size * n)
    while todo or engine.pending():
        while todo and (flying == 0 or flying + todo[-1][2] <= max_in_flight):
            b, c0, cc = todo.pop()
            engine.submit((b, c0), prompts[b], settings.max_new_tokens, settings, seeds[b], n=cc, first_draw=c0)
            flying += cc
        complete = []
        for done in engine.poll():
            b, c0 = done.key
            got[b][c0:c0 + len(done.completions)] = done.completions
            flying -= len(done.completions)
            drawn += len(done.completions)
            forward, cached = forward + done.forward_tokens, cached + done.cached_tokens
            missing[b] -= len(done.completions)
            if missing[b] == 0:
                complete.append(b)
        if complete:
            settings.report("candidates", drawn, batch.size * n)
            if score is not None:  # while the other prompts' requests stay in flight
                rewards[complete] = torch.as_tensor(
                    score(complete, [[c.tokens for c in got[b]] for b in complete]), dtype=torch.float32)
    from .engine import EngineOutput

    sampled = EngineOutput(got, forward, cached)
    out = sampled.decoded(settings.pad_id, device=batch.input_ids.device)
    out.extras["seeds"] = [[c.seed for c in per_prompt] for per_prompt in got]
    return out, rewards
