"""Blockwise controlled decoding (Mudgal et al., ICML 2024): best-of-K, one block of M tokens at a time.

From the current prefix y, for every row:
  1. draw K continuations of up to M tokens from the policy (a continuation ends early at a stop token
     or at the response's length cap);
  2. keep the one with the highest V(x, y + block) (first index on ties), append it;
  3. repeat until the kept block ends in a stop token or the response reaches the cap.

K = 1 is plain sampling; M >= the length cap with V = r (a sequence reward) is best-of-K, whose exact
law is p(y) / p(r(Y) = r(y)) * (F(r(y))^K - F-(r(y))^K). Between the two, each block follows that
best-of-K law over blocks from its own prefix.

The prefix is never recomputed: each row's KV cache is forked K ways for a block (a `select` with
repeated indices), the loop decodes the block on the forks, and the kept fork becomes the row's cache.

Random streams: candidate j of a row draws its token t from stream j at step t, where stream 0 is the
row's own seed (the one plain sampling uses) and stream j > 0 a seed derived from it. Every draw of a
row uses a distinct (stream, step) pair, so blocks are independent given their prefix, and K = 1
reproduces plain sampling draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import derive_seeds
from .candidates import score_completions
from .guides.base import GuideContext
from .loop import Decoded, decode
from .options import BlockwiseCDOptions
from .report import Report
from .prompts import PromptBatch
from .settings import GenerationSettings, validate_ids
from .strategy import Strategy, TokenStrategy


@dataclass
class BlockwiseReport(Report):
    """One call of blockwise CD, per row."""

    block_values: list[list[list[float]]]  # [rows][blocks] the K candidates' values at each block (K > 1)
    blocks: list[int]  # [rows] blocks drawn
    forward_tokens: int  # token positions run through the policy


def candidate_streams(row_seeds: torch.Tensor, k: int) -> torch.Tensor:
    """[R, K] seeds: column 0 the rows' own seeds, column j > 0 a child stream of each."""
    cols = [row_seeds] + [derive_seeds(row_seeds, j) for j in range(1, k)]
    return torch.stack(cols, dim=1)


def pick_best(values: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the highest value; the first one wins ties (torch.argmax's rule)."""
    return values.argmax(dim=-1)


class BlockwiseCD(Strategy):
    """Blockwise controlled decoding: best-of-K over blocks of M tokens, scored by a value or a reward.

    Args:
        scorer: what ranks prefix + block: a value model (QValueModel, ScalarValueModel), a SequenceReward
            applied to partial responses, or any object with `score_ids(prompt_ids, completion_ids)`.
            Not needed for K = 1.
        num_candidates: K, blocks drawn per step, >= 1.
        block_size: M, tokens per block, >= 1. M >= max_new_tokens is best-of-K on whole responses.
        proposal: the token-level strategy drawing blocks (plain sampling by default; e.g. GenARM):
            its guides and weights are used, its guide states forked with the policy's cache.
        (K and M are declared with their ranges in `decoding.options.BlockwiseCDOptions`.)

    The K blocks differ only when sampling (do_sample=True); greedy decoding draws K equal blocks.

    Example:
        >>> cd = BlockwiseCD(QValueModel(value_lm, tok), num_candidates=4, block_size=8)
        >>> out = AlignedModel(model, tokenizer=tok, strategy=cd).generate(**inputs, do_sample=True,
        ...                                                               return_dict_in_generate=True)
        >>> out.alignment["block_values"][0]   # row 0: the K values of each of its blocks
    """

    name = "cd_blockwise"

    def __init__(self, scorer=None, num_candidates: int = BlockwiseCDOptions.num_candidates,
                 block_size: int = BlockwiseCDOptions.block_size, proposal: TokenStrategy | None = None):
        self.options = BlockwiseCDOptions(num_candidates=num_candidates, block_size=block_size)
        if scorer is None and num_candidates > 1:
            raise ValueError("num_candidates > 1 needs a scorer (a value model or a sequence reward) to pick blocks")
        scores = scorer is not None and any(callable(getattr(scorer, m, None)) for m in ("score_ids", "score"))
        if scorer is not None and not scores:
            raise TypeError(f"scorer must be a value model or a sequence reward, got {type(scorer).__name__}")
        if proposal is not None and not isinstance(proposal, TokenStrategy):
            raise TypeError("proposal must be a token-level strategy (Sample, GenARM, TokenwiseCD, ...)")
        self.scorer, self.k, self.block_size, self.proposal = scorer, num_candidates, block_size, proposal

    def with_candidates(self, num_candidates: int, block_size: int | None = None) -> "BlockwiseCD":
        """The same scorer with another K (and M): a new trade-off without reloading anything."""
        return BlockwiseCD(self.scorer, num_candidates, block_size or self.block_size, self.proposal)

    def hyperparameters(self) -> dict:
        return {"num_candidates": self.k, "block_size": self.block_size,
                "scorer": getattr(self.scorer, "name", None if self.scorer is None else type(self.scorer).__name__),
                "proposal": None if self.proposal is None else self.proposal.name}

    def _proposal_guides(self, policy, settings: GenerationSettings):
        if self.proposal is None:
            return [], settings.temperature, []
        guides = list(self.proposal.guides())
        temperature, weights = self.proposal.mixing(settings)
        kept = [i for i, w in enumerate(weights) if w != 0]
        return [guides[i] for i in kept], temperature, [weights[i] for i in kept]

    def _values(self, policy, prompt_ids, prompt_texts, owners, completions, rows: int) -> torch.Tensor:
        """[rows, K] values of prefix + block, all candidates in one scorer call."""
        texts = None if prompt_texts is None else [prompt_texts[i] for i in owners]
        ids = [prompt_ids[i] for i in owners]
        return score_completions(self.scorer, policy.tokenizer, texts, completions, ids).view(rows, self.k)

    def run(self, policy, batch: PromptBatch, settings: GenerationSettings) -> Decoded:
        n, cap, k = settings.num_return_sequences, settings.max_new_tokens, self.k
        settings = settings.with_fixed_seeds(batch.size)
        guides, temperature, weights = self._proposal_guides(policy, settings)
        width = policy.width(guides)
        validate_ids(settings.stop_ids, width, "eos_token_id")
        validate_ids([settings.pad_id], width, "pad_token_id")
        rows_batch = batch.repeat_interleave(n)
        prompt_ids = [p.tolist() for p in rows_batch.token_lists()]
        reads_text = k > 1 and not callable(getattr(self.scorer, "score_ids", None))
        prompt_texts = rows_batch.prompt_texts(policy.tokenizer) if reads_text else None

        session, logits = policy.start(batch, width, repeats=n)
        device = logits.device
        seeds = settings.row_seeds(batch.size, n, device)
        context = GuideContext(rows_batch, width, settings, seeds, policy.tokenizer, session)
        states = [g.start(context) for g in guides]
        streams = candidate_streams(seeds, k)  # [R, K]
        rows = _Responses(batch.size * n)
        live = torch.arange(batch.size * n)  # original row of each session row
        blocks = sampled = 0
        while cap > 0 and live.numel():
            done = torch.tensor([len(rows.tokens[i]) for i in live.tolist()], dtype=torch.long)
            # Fork every row K ways: candidate j of row l is session row l * K + j.
            fork = torch.arange(live.numel(), device=device).repeat_interleave(k)
            _select(session, states, fork)
            w = torch.tensor(weights, dtype=torch.float32, device=device).expand(fork.numel(), len(weights))
            out = decode(
                session, logits[fork], states, w if guides else None,
                sampling=settings.sampling_rows(streams[live.to(device)].reshape(-1), temperature),
                max_new_tokens=(cap - done).clamp(max=self.block_size).repeat_interleave(k).to(device),
                stop_ids=settings.stop_ids, pad_id=settings.pad_id,
                step_offset=done.repeat_interleave(k).to(device),  # token t of a row draws at step t
                prune_finished=False,
            )
            blocks += 1
            sampled += out.total_sampled()
            drawn = [out.tokens[r, : int(out.lengths[r])].tolist() for r in range(fork.numel())]
            values, choice = None, torch.zeros(live.numel(), dtype=torch.long)
            if k > 1:
                owners = live.repeat_interleave(k).tolist()
                completions = [rows.tokens[i] + d for i, d in zip(owners, drawn)]
                values = self._values(policy, prompt_ids, prompt_texts, owners, completions, live.numel())
                choice = pick_best(values)
            picked = torch.arange(live.numel()) * k + choice
            for l, i in enumerate(live.tolist()):
                r = int(picked[l])
                rows.append(i, drawn[r], out.logprobs[r, : len(drawn[r])].tolist(), bool(out.stopped[r]),
                            None if values is None else values[l].tolist())
            going = torch.tensor([not rows.stopped[i] and len(rows.tokens[i]) < cap for i in live.tolist()])
            if not bool(going.any()):
                break
            # The kept forks hold every token of their block but the last one drawn: feed it.
            keep = picked[going]
            _select(session, states, keep.to(device))
            last = torch.tensor([drawn[int(r)][-1] for r in keep], dtype=torch.long, device=device)
            logits = session.step(last)
            for s in states:
                s.advance(last)
            session.maybe_compact()
            live = live[going]
        out = rows.decoded(settings.pad_id, device, blocks, session.forward_tokens)
        out.sampled_tokens = sampled  # all K candidate blocks of every step
        return out


def _select(session, states, index: torch.Tensor) -> None:
    """Keep, drop or fork rows of the policy session and of every guide state alike."""
    session.select(index)
    for s in states:
        s.select(index)


class _Responses:
    """Each output row's response so far, block by block."""

    def __init__(self, count: int):
        self.tokens: list[list[int]] = [[] for _ in range(count)]
        self.logprobs: list[list[float]] = [[] for _ in range(count)]
        self.values: list[list[list[float]]] = [[] for _ in range(count)]  # per block: the K candidates' values
        self.blocks = [0] * count
        self.stopped = [False] * count

    def append(self, row: int, tokens: list[int], logprobs: list[float], stopped: bool, values) -> None:
        self.tokens[row] += tokens
        self.logprobs[row] += logprobs
        self.stopped[row] = stopped
        self.blocks[row] += 1
        if values is not None:
            self.values[row].append(values)

    def decoded(self, pad_id: int, device, steps: int, forward_tokens: int) -> Decoded:
        width = max((len(t) for t in self.tokens), default=0)
        tokens = torch.full((len(self.tokens), width), pad_id, dtype=torch.long)
        logprobs = torch.zeros(len(self.tokens), width)
        for i, (t, lp) in enumerate(zip(self.tokens, self.logprobs)):
            tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            logprobs[i, : len(t)] = torch.tensor(lp)
        return Decoded(
            tokens=tokens.to(device),
            lengths=torch.tensor([len(t) for t in self.tokens], dtype=torch.long, device=device),
            stopped=torch.tensor(self.stopped, dtype=torch.bool, device=device),
            logprobs=logprobs.to(device),
            steps=steps,
            extras=BlockwiseReport(block_values=self.values, blocks=self.blocks, forward_tokens=forward_tokens),
        )
