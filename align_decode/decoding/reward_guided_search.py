"""ARGS (Khanov et al., ICLR 2024): reward-guided search over the policy's top-k tokens.

At each step, for the policy's k most likely tokens v (k = 10 in the paper), with a sequence reward r
applied to the partial response:

    s(v) = log p(v | x, y) + w * r(x, y + v)
    greedy:  y_t = argmax_v s(v)
    sampled: y_t ~ softmax(s / tau)  over the k candidates       (tau = the temperature)

The official code uses raw logits where this uses log-probs: within a step they differ by a constant
over the candidates, so the argmax and the softmax are the same. The k reward calls of a step (for all
rows, B*k of them) are one call to the reward; a ScalarValueModel reward model scores them with its own
KV cache instead. w = 0 or k = 1 gives greedy decoding (sampling: top-k sampling).

The official code never stops at EOS (it always writes max_new_tokens tokens and cuts the text
afterwards); `stop_at_eos=False` does the same. The default stops at EOS.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .guides.topk import TopKGuide
from .guides.value import PrefixRewardGuide, ScalarValueModel
from .options import ARGSOptions
from .settings import GenerationSettings
from .strategy import TokenStrategy


class ARGS(TokenStrategy):
    """Reward-guided decoding on the policy's top-k tokens: s(v) = log p(v) + w * r(prefix + v).

    Args:
        reward: a SequenceReward (text, scored on partial responses) or any object with `score_ids`;
            or a ScalarValueModel (a reward model over the policy's tokens, scored with a KV cache).
        weight: w, the reward's weight (paper: 1.5). 0 gives the policy (greedy, or top-k sampling).
        k: candidates per step, >= 1 (paper: 10); checked against the vocabulary at generation.
        stop_at_eos: stop a row at the stop token (default); False always writes max_new_tokens
            tokens, as the official code does.
        (Declared with their ranges in `decoding.options.ARGSOptions`.)

    Greedy (do_sample=False) is ARGS-greedy; do_sample=True is ARGS-stochastic at tau = temperature.

    Example:
        >>> args = ARGS(SentimentReward(), weight=1.5, k=10)
        >>> out = AlignedModel(model, tokenizer=tok, strategy=args).generate(**inputs, max_new_tokens=64)
        >>> out = aligned.generate(**inputs, strategy=args.with_weights([3.0]))   # another w, no reload
    """

    name = "args"

    def __init__(self, reward, weight: float = ARGSOptions.weight, k: int = ARGSOptions.k,
                 stop_at_eos: bool = ARGSOptions.stop_at_eos):
        self.options = ARGSOptions(weight=weight, k=k, stop_at_eos=stop_at_eos)
        self.weight, self.k, self.stop_at_eos = self.options.weight, self.options.k, self.options.stop_at_eos
        self.reward = reward
        if isinstance(reward, ScalarValueModel):
            self.guide: TopKGuide = reward.with_k(k)
        elif isinstance(reward, TopKGuide):
            raise TypeError("ARGS takes the reward itself (a SequenceReward or a ScalarValueModel), not a top-k guide")
        else:
            self.guide = PrefixRewardGuide(reward, k)

    def with_weights(self, weights: Sequence[float]) -> "ARGS":
        """The same reward with another w (a one-element sequence, as for the other strategies)."""
        weights = list(weights)
        if len(weights) != 1:
            raise ValueError(f"ARGS has one reward weight, got {len(weights)}")
        return ARGS(self.reward, weights[0], self.k, self.stop_at_eos)

    def guides(self):
        return [self.guide]

    def mixing(self, settings: GenerationSettings) -> tuple[float, list[float]]:
        # The loop draws from softmax(log p / T + w' * r): w' = w / tau makes that softmax(s / tau).
        # Greedy rows take the argmax at T = 1, where w' = w.
        weight = self.weight
        if settings.do_sample:
            return settings.temperature, [weight / settings.temperature]
        return settings.temperature, [weight]

    def adjust(self, settings: GenerationSettings) -> GenerationSettings:
        # The draw is among the k candidates even when w = 0 drops the reward from the mix.
        if settings.do_sample and not 0 < settings.top_k <= self.k:
            settings = replace(settings, top_k=self.k)
        if not self.stop_at_eos:
            settings = replace(settings, stop_ids=())
        return settings

    def hyperparameters(self) -> dict:
        return {"weight": self.weight, "k": self.k, "stop_at_eos": self.stop_at_eos,
                "reward": getattr(self.reward, "name", type(self.reward).__name__)}
