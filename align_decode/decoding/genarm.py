"""GenARM (Xu et al., ICLR 2025): autoregressive reward models mixed into the policy token by token.

With ARMs pi_r_i and weights a_i the next-token law is

    log p(v) = log_softmax( log p_base(v) / T + sum_i a_i * log pi_r_i(v) ),      a = 1/beta for one ARM,

normalised at every token (so the sequence law is not p_base * pi_r^a / Z in general).

`temperature_semantics="model_arithmetic"` reproduces the official code, which divides the weighted sum
by the norm (1 + sum a_i) and by the temperature it is given, T_in:

    P(v) = softmax( (log p_base(v) + sum_i a_i log pi_r_i(v)) / ((1 + sum a_i) * T_in) ).

That is the formula above with T = (1 + sum a) * T_in and weights a_i / T; the official scripts pass
T_in = 1 / (1 + sum a) to get T = 1. `normalize_logit=True` forces T_in = 1 (a weighted geometric mean).
"""

from __future__ import annotations

from typing import Sequence

from .options import GenARMOptions
from .settings import GenerationSettings
from .guides.base import as_guides
from .strategy import TokenStrategy


class GenARM(TokenStrategy):
    """Guide the policy with one or more autoregressive reward models.

    Args:
        arms: an ARM (or any Guide) or a sequence of them, sharing the policy's tokenizer.
        beta: for a single ARM, the KL strength: weight 1/beta (1.0 when neither beta nor weights is given).
        weights: one weight a_i per ARM (multi-objective trade-offs); exclusive with beta.
        temperature_semantics: "paper" (default) or "model_arithmetic" (the official code's).
        normalize_logit: with model_arithmetic, force T_in = 1 as the official flag does.
        (Declared with their ranges in `decoding.options.GenARMOptions`.)

    Example:
        >>> strategy = GenARM([helpful_arm, harmless_arm], weights=[1.0, 0.5])
        >>> out = AlignedModel(model, tokenizer=tok, strategy=strategy).generate(**inputs, max_new_tokens=64)
        >>> out = aligned.generate(**inputs, strategy=strategy.with_weights([0.2, 2.0]))  # no reload
    """

    name = "genarm"

    def __init__(
        self,
        arms,
        beta: float | None = GenARMOptions.beta,
        weights: Sequence[float] | None = GenARMOptions.weights,
        temperature_semantics: str = GenARMOptions.temperature_semantics,
        normalize_logit: bool = GenARMOptions.normalize_logit,
    ):
        self.arms = as_guides(arms, "GenARM arms")
        self.options = GenARMOptions(beta=beta, weights=None if weights is None else tuple(weights),
                                     temperature_semantics=temperature_semantics, normalize_logit=normalize_logit)
        self.weights = self.options.guide_weights(len(self.arms))
        self.beta = self.options.beta
        self.temperature_semantics = temperature_semantics
        self.normalize_logit = normalize_logit

    def with_weights(self, weights: Sequence[float]) -> "GenARM":
        """The same ARMs with other weights: a new trade-off without reloading anything."""
        return GenARM(self.arms, weights=weights, temperature_semantics=self.temperature_semantics,
                      normalize_logit=self.normalize_logit)

    def guides(self):
        return self.arms

    def mixing(self, settings: GenerationSettings) -> tuple[float, list[float]]:
        if self.temperature_semantics == "paper" or not settings.do_sample:
            # Greedy: the argmax of the weighted sum, which no positive rescaling changes.
            return settings.temperature, list(self.weights)
        t_in = 1.0 if self.normalize_logit else settings.temperature
        t_eff = (1.0 + sum(self.weights)) * t_in
        if t_eff <= 0:
            raise ValueError(f"model_arithmetic semantics needs 1 + sum(weights) > 0, got {1.0 + sum(self.weights)}")
        return t_eff, [w / t_eff for w in self.weights]

    def hyperparameters(self) -> dict:
        return {
            "arms": [a.name for a in self.arms],
            "weights": self.weights,
            "beta": self.beta,
            "temperature_semantics": self.temperature_semantics,
            "normalize_logit": self.normalize_logit,
        }
