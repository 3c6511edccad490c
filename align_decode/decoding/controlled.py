"""Tokenwise controlled decoding (Mudgal et al., ICML 2024): the policy reweighted by a value model.

With the policy p, value models V_i (the policy's expected reward from a prefix on) and weights w_i,
each next token is drawn from

    pi(z | x, y) ∝ p(z | x, y)^(1/T) * exp( sum_i w_i * V_i(x, y + z) ),       w = lambda for one model,

the closed-form maximiser of  lambda * E_z[V(x, y + z)] - KL(pi || p)  at T = 1. It is normalised at
every token, so the sequence law is not p * exp(lambda * r) / Z in general. lambda = 0 gives back the
policy; lambda -> infinity the argmax of V over the policy's support. Several value models add linearly
in log space (multi-objective control without retraining).

A Q-head model (`QValueModel`) gives V for every z in one forward. A scalar scorer (`ScalarValueModel`,
`PrefixRewardGuide`) is read on the policy's top-k tokens only, so the draw is restricted to them;
blockwise CD (`BlockwiseCD`) ranks whole blocks instead.
"""

from __future__ import annotations

from typing import Sequence

from .guides.base import as_guides
from .options import TokenwiseCDOptions
from .settings import GenerationSettings
from .strategy import TokenStrategy


class TokenwiseCD(TokenStrategy):
    """Controlled decoding, token by token, with one or more value models.

    Args:
        value_models: a value model or a sequence of them, sharing the policy's tokenizer: a
            QValueModel (every next token), a ScalarValueModel or PrefixRewardGuide (top-k candidates).
        strength: lambda, the weight of a single value model (default 1.0). 0 gives the policy.
        weights: one weight per value model (V = sum_i w_i V_i); exclusive with strength.
        (Declared with their ranges in `decoding.options.TokenwiseCDOptions`.)

    Example:
        >>> cd = TokenwiseCD([QValueModel(helpful, tok), QValueModel(harmless, tok)], weights=[1.0, 2.0])
        >>> out = AlignedModel(model, tokenizer=tok, strategy=cd).generate(**inputs, do_sample=True)
        >>> out = aligned.generate(**inputs, do_sample=True, strategy=cd.with_weights([2.0, 0.5]))
    """

    name = "cd_tokenwise"

    def __init__(self, value_models, strength: float | None = TokenwiseCDOptions.strength,
                 weights: Sequence[float] | None = TokenwiseCDOptions.weights):
        self.value_models = as_guides(value_models, "value_models")
        self.options = TokenwiseCDOptions(strength=strength, weights=None if weights is None else tuple(weights))
        self.strength = self.options.strength
        self.weights = self.options.guide_weights(len(self.value_models))

    def with_weights(self, weights: Sequence[float]) -> "TokenwiseCD":
        """The same value models with other weights: a new trade-off without reloading anything."""
        return TokenwiseCD(self.value_models, weights=weights)

    def guides(self):
        return list(self.value_models)

    def mixing(self, settings: GenerationSettings) -> tuple[float, list[float]]:
        return settings.temperature, list(self.weights)

    def hyperparameters(self) -> dict:
        return {
            "value_models": [getattr(v, "name", type(v).__name__) for v in self.value_models],
            "weights": self.weights,
            "strength": self.strength,
            "top_k": [getattr(v, "k", None) for v in self.value_models],
        }
