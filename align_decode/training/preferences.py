"""Preference pairs for ARM training, made from a policy and a sequence reward (`align-decode make-preferences`).

For each prompt, K responses are drawn from the policy with the best-of-N sampler (`sample_candidates`),
scored with the reward, and the best is paired with the worst:

    {"id": ..., "prompt": ..., "chosen": y_best, "rejected": y_worst, "chosen_reward": r_best, ...}

This is the (prompt, chosen, rejected) JSONL that `align-decode train-arm` reads, so an ARM can be
trained for any reward the project can compute. Best against worst gives the widest margin the K
samples hold; a prompt whose samples all score within `min_margin` of each other (or whose best and
worst texts are the same) says nothing about the reward and gets no pair.

Each prompt draws from its own seed (derived from the run's seed and the prompt's id, as `align-decode
run` does), so the pairs do not depend on batching and a resumed file continues with the same draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import torch

from ..decoding.candidates import completion_ids, sample_candidates, score_completions
from ..decoding.prompts import PromptBatch, left_pad
from ..decoding.settings import GenerationSettings
from ..decoding.strategy import Policy, Sample
from ..validation import AT_LEAST_ONE, NON_NEGATIVE_INT, POSITIVE, Bounds


@dataclass(frozen=True)
class PreferenceSettings:
    """How pairs are sampled; every field is validated."""

    samples: int = 8  # K responses per prompt
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_margin: float = 0.0  # a pair needs r(best) - r(worst) > min_margin
    batch_size: int = 8  # prompts sampled together
    max_rows: int = 64  # rows per forward pass (batch_size * samples is split into chunks of it)
    seed: int = 0

    def __post_init__(self):
        Bounds(ge=2, integer=True).check(self.samples, "samples")  # one sample cannot be paired with anything
        AT_LEAST_ONE.check(self.max_new_tokens, "max_new_tokens")
        NON_NEGATIVE_INT.check(self.top_k, "top_k")
        AT_LEAST_ONE.check(self.batch_size, "batch_size")
        AT_LEAST_ONE.check(self.max_rows, "max_rows")
        POSITIVE.check(self.temperature, "temperature")  # pairs are sampled: no greedy 0
        Bounds(gt=0, le=1).check(self.top_p, "top_p")
        Bounds(ge=0).check(self.min_margin, "min_margin")
        Bounds(ge=0, lt=2**63, integer=True).check(self.seed, "seed")


def pick_pair(rewards: Sequence[float], texts: Sequence[str], min_margin: float = 0.0) -> tuple[int, int] | None:
    """(index of the best, index of the worst) sample, the first one winning ties; None when the margin
    is not above min_margin or both are the same text (no preference to learn)."""
    if len(rewards) != len(texts) or len(rewards) < 2:
        raise ValueError(f"need at least 2 samples with one reward each, got {len(rewards)} rewards, {len(texts)} texts")
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    if not rewards[best] - rewards[worst] > min_margin or texts[best] == texts[worst]:
        return None
    return best, worst


@dataclass
class PromptSamples:
    """The K scored samples of one prompt, and the pair made from them (None if it has none)."""

    index: int  # position in the prompt list given
    texts: list[str]
    rewards: list[float]
    pair: tuple[int, int] | None
    responses: list[list[int]] = field(default_factory=list)  # token ids, the stop token included

    def line(self, prompt_id, prompt) -> dict | None:
        """The JSONL record (load_preferences reads prompt, chosen, rejected), or None without a pair."""
        if self.pair is None:
            return None
        best, worst = self.pair
        return {
            "id": prompt_id,
            "prompt": prompt,
            "chosen": self.texts[best],
            "rejected": self.texts[worst],
            "chosen_reward": self.rewards[best],
            "rejected_reward": self.rewards[worst],
            "mean_reward": sum(self.rewards) / len(self.rewards),
            "samples": len(self.rewards),
        }


def sample_preferences(
    policy: Policy,
    prompt_ids: Sequence[Sequence[int]],
    prompt_texts: Sequence[str],
    seeds: Sequence[int],
    reward,
    settings: PreferenceSettings,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[PromptSamples]:
    """Sample, score and pair, batch_size prompts at a time, yielding each prompt's result in order.

    prompt_ids: each prompt's token ids (chat template applied when wanted); prompt_texts: the prompts
    as the reward reads them; seeds: one per prompt."""
    if not len(prompt_ids) == len(prompt_texts) == len(seeds):
        raise ValueError(f"{len(prompt_ids)} prompts, {len(prompt_texts)} texts and {len(seeds)} seeds: need one each")
    base = GenerationSettings.resolve(
        policy.model, policy.tokenizer, None, 0, max_new_tokens=settings.max_new_tokens, do_sample=True,
        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
    )
    k = settings.samples
    done = 0
    for start in range(0, len(prompt_ids), settings.batch_size):
        chunk = slice(start, start + settings.batch_size)
        texts = list(prompt_texts[chunk])
        ids, mask = left_pad(list(prompt_ids[chunk]), base.pad_id, device=policy.device)
        batch = PromptBatch(ids, mask, texts)
        run_settings = replace(base, seeds=torch.tensor(list(seeds[chunk]), dtype=torch.long))
        drawn = sample_candidates(Sample(), policy, batch, run_settings, k, settings.max_rows)
        responses = completion_ids(drawn)
        rewards = score_completions(reward, policy.tokenizer, [t for t in texts for _ in range(k)], responses,
                                    [list(p) for p in prompt_ids[chunk] for _ in range(k)])
        decoded = policy.tokenizer.batch_decode(responses, skip_special_tokens=True)
        for b in range(len(texts)):
            r = rewards[b * k:(b + 1) * k].tolist()
            if not all(math.isfinite(v) for v in r):
                raise ValueError(f"the reward returned a non-finite value for prompt {start + b}: {r}")
            t = decoded[b * k:(b + 1) * k]
            yield PromptSamples(start + b, t, r, pick_pair(r, t, settings.min_margin), responses[b * k:(b + 1) * k])
        done += len(texts)
        if progress is not None:
            progress(done, len(prompt_ids))
