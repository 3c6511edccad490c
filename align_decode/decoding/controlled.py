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

import copy
import math
from typing import Sequence

from .guides.value import with_policy_tokenizer
from .settings import GenerationSettings
from .strategy import TokenStrategy


def check_weight(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def as_guide_list(models, what: str) -> list:
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ValueError(f"{what}: at least one is needed")
    for m in models:
        if not (hasattr(m, "start") and hasattr(m, "width_for")):
            raise TypeError(
                f"{what} must be QValueModel, ScalarValueModel, PrefixRewardGuide or other guide objects, "
                f"got {type(m).__name__}"
            )
    return models


class TokenwiseCD(TokenStrategy):
    """Controlled decoding, token by token, with one or more value models.

    Args:
        value_models: a value model or a sequence of them, sharing the policy's tokenizer: a
            QValueModel (every next token), a ScalarValueModel or PrefixRewardGuide (top-k candidates).
        strength: lambda, the weight of a single value model (default 1.0). 0 gives the policy.
        weights: one weight per value model (V = sum_i w_i V_i); exclusive with strength.

    Example:
        >>> cd = TokenwiseCD([QValueModel(helpful, tok), QValueModel(harmless, tok)], weights=[1.0, 2.0])
        >>> out = AlignedModel(model, tokenizer=tok, strategy=cd).generate(**inputs, do_sample=True)
        >>> out = aligned.generate(**inputs, do_sample=True, strategy=cd.with_weights([2.0, 0.5]))
    """

    name = "cd_tokenwise"

    def __init__(self, value_models, strength: float | None = None, weights: Sequence[float] | None = None):
        self.value_models = as_guide_list(value_models, "value_models")
        if strength is not None and weights is not None:
            raise ValueError("give either strength (one value model) or weights (one per value model), not both")
        if weights is None:
            strength = 1.0 if strength is None else check_weight(strength, "strength")
            if len(self.value_models) != 1:
                raise ValueError(
                    f"strength weighs a single value model; with {len(self.value_models)} value models pass weights"
                )
            weights = [strength]
        weights = [check_weight(w, "each value model weight") for w in weights]
        if len(weights) != len(self.value_models):
            raise ValueError(f"{len(weights)} weight(s) for {len(self.value_models)} value model(s)")
        self.strength = strength
        self.weights = weights

    def with_weights(self, weights: Sequence[float]) -> "TokenwiseCD":
        """The same value models with other weights: a new trade-off without reloading anything."""
        return TokenwiseCD(self.value_models, weights=weights)

    def guides(self):
        return list(self.value_models)

    def mixing(self, settings: GenerationSettings) -> tuple[float, list[float]]:
        return settings.temperature, list(self.weights)

    def run(self, policy, batch, settings):
        # Text rewards on partial responses decode them with the policy's tokenizer.
        bound = copy.copy(self)
        bound.value_models = [with_policy_tokenizer(v, policy.tokenizer) for v in self.value_models]
        return TokenStrategy.run(bound, policy, batch, settings)

    def hyperparameters(self) -> dict:
        return {
            "value_models": [getattr(v, "name", type(v).__name__) for v in self.value_models],
            "weights": self.weights,
            "strength": self.strength,
            "top_k": [getattr(v, "k", None) for v in self.value_models],
        }
