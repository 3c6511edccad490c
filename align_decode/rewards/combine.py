"""Combining and transforming sequence rewards: weighted sums, clamping, and the log-sigmoid transform of
"Transforming and Combining Rewards for Aligning Large Language Models" (Wang et al., 2024)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..validation import FINITE, PROBABILITY, check_choice
from .base import SequenceReward


def _check_reward(reward, where: str) -> SequenceReward:
    if not isinstance(reward, SequenceReward):
        raise TypeError(
            f"{where} must be a SequenceReward, got {type(reward).__name__} (wrap functions in CallableReward)"
        )
    return reward


class WeightedSum(SequenceReward):
    """A weighted sum of rewards.

        r(x, y) = sum_i w_i * r_i(x, y)

    Each reward scores the whole batch once. `reward_a + reward_b` and `w * reward` build the same thing
    (nested sums are flattened).

    Args:
        terms: (reward, weight) pairs; weights are finite numbers (negative weights are allowed, to
            penalise a property).
        name: a label for errors and logs.

    Example:
        >>> both = WeightedSum([(SentimentReward(), 1.0), (LengthReward(max_length=20), 0.1)])
        >>> both = SentimentReward() + 0.1 * LengthReward(max_length=20)  # the same
    """

    def __init__(self, terms: Sequence[tuple[SequenceReward, float]], name: str | None = None):
        terms = list(terms)
        if not terms:
            raise ValueError("WeightedSum needs at least one (reward, weight) term")
        self.terms: list[tuple[SequenceReward, float]] = []
        for i, term in enumerate(terms):
            if not (isinstance(term, tuple) and len(term) == 2):
                raise TypeError(f"WeightedSum term {i} must be a (reward, weight) pair, got {term!r}")
            reward, weight = term
            reward = _check_reward(reward, f"term {i}'s reward")
            self.terms.append((reward, FINITE.check(weight, f"term {i}'s weight")))
        self.name = name or " + ".join(f"{w:g}*{r.name}" for r, w in self.terms)

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        total = torch.zeros(len(prompts), dtype=torch.float64)
        for reward, weight in self.terms:
            total += weight * reward.score(prompts, completions).double()
        return total


class Clamp(SequenceReward):
    """A reward clipped to [low, high].

        r'(x, y) = min(max(r(x, y), low), high)

    QUEST/QAlign clamp their reward model's output to [-40, 40] so that exp(r / beta) stays finite.

    Args:
        reward: the reward to clip.
        low, high: the bounds (either may be None for an open side; low <= high).

    Example:
        >>> Clamp(LengthReward(max_length=1), low=-2.0).score(["", ""], ["a b", "a b c d e"])
        tensor([-1., -2.])
    """

    def __init__(self, reward: SequenceReward, low: float | None = None, high: float | None = None):
        self.reward = _check_reward(reward, "reward")
        self.low = None if low is None else FINITE.check(low, "low")
        self.high = None if high is None else FINITE.check(high, "high")
        if self.low is None and self.high is None:
            raise ValueError("Clamp needs low and/or high")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        self.name = f"clamp({reward.name})"

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        return self.reward.score(prompts, completions).clamp(min=self.low, max=self.high)


class LogSigmoidTransform(SequenceReward):
    """The log-sigmoid transform of a reward, centred per prompt on a reference level.

        u(x, y) = log sigmoid( r(x, y) - r_ref(x) )          in (-inf, 0)

    Under a Bradley-Terry reward model, sigmoid(r(x, y) - r_ref(x)) is the probability that y is
    preferred to the reference, so u is the log-probability that y is "good" (better than the
    reference). A sum of transformed rewards u_1 + u_2 is then the log-probability that y is good in
    property 1 AND in property 2 (if independent): it saturates near 0 for properties that are already
    good, and is dominated by the worst property, so one great property cannot buy off a bad one as it
    can in a plain sum of rewards.

    Where r_ref comes from: the paper uses the reward of a reference response to x (e.g. one from the
    base policy). With several reference samples per prompt, `fit_reference` takes a statistic of
    their rewards: a quantile (default 0.5, the median; a higher quantile sets a higher bar for "good")
    or the mean. With one sample per prompt every statistic is that sample's reward. A single float
    reference applies to every prompt. Scoring a prompt with no reference level raises a KeyError
    naming it.

    Computed with torch.nn.functional.logsigmoid in float64: for r - r_ref -> -inf it returns
    r - r_ref (not -inf), and for r - r_ref -> +inf it returns ~ -exp(-(r - r_ref)) (not log 1 = 0 by
    cancellation).

    Args:
        reward: the reward to transform.
        reference: None (call `fit_reference` before scoring), a float for every prompt, or a dict
            prompt -> r_ref.
        statistic: "quantile" (default) or "mean", used by `fit_reference`.
        quantile: the quantile in [0, 1] for statistic="quantile" (default 0.5), linearly interpolated.

    Example:
        >>> helpful = LogSigmoidTransform(rm_helpful).fit_reference(prompts, base_samples)   # lists per prompt
        >>> harmless = LogSigmoidTransform(rm_harmless).fit_reference(prompts, base_samples)
        >>> both = helpful + harmless   # "helpful AND harmless"
        >>> LogSigmoidTransform(LengthReward(max_length=2), reference=0.0).score([""], ["a b"])
        tensor([-0.6931])
    """

    STATISTICS = ("quantile", "mean")

    def __init__(self, reward: SequenceReward, reference: float | Mapping[str, float] | None = None,
                 statistic: str = "quantile", quantile: float = 0.5):
        self.reward = _check_reward(reward, "reward")
        check_choice(statistic, "statistic", self.STATISTICS)
        self.statistic = statistic
        self.quantile = PROBABILITY.check(quantile, "quantile")
        self.default_reference: float | None = None
        self.reference: dict[str, float] = {}
        if isinstance(reference, Mapping):
            for prompt, value in reference.items():
                self.reference[prompt] = FINITE.check(value, f"reference level for prompt {prompt[:60]!r}")
        elif reference is not None:
            self.default_reference = FINITE.check(reference, "reference")
        self.name = f"logsigmoid({reward.name})"

    def fit_reference(
        self, prompts: Sequence[str], reference_completions: Sequence[Sequence[str] | str]
    ) -> "LogSigmoidTransform":
        """Set r_ref(x) for each prompt from reference completions, and return self.

        Args:
            prompts: the prompts.
            reference_completions: for each prompt, a list of reference completions (or a single
                string). The rewards of a prompt's completions are reduced with this transform's
                statistic; a prompt that appears twice pools its completions.
        """
        prompts = list(prompts)
        reference_completions = list(reference_completions)
        if len(prompts) != len(reference_completions):
            raise ValueError(f"{len(prompts)} prompts but {len(reference_completions)} lists of reference completions")
        pooled: dict[str, list[str]] = {}
        for prompt, refs in zip(prompts, reference_completions):
            refs = [refs] if isinstance(refs, str) else list(refs)
            pooled.setdefault(prompt, []).extend(refs)
        for prompt, refs in pooled.items():
            if not refs:
                raise ValueError(f"no reference completions for prompt {prompt[:60]!r}")
        flat_prompts = [p for p, refs in pooled.items() for _ in refs]
        flat_refs = [c for refs in pooled.values() for c in refs]
        # one batched call for all prompts' references
        rewards = self.reward.score(flat_prompts, flat_refs).double()
        start = 0
        for prompt, refs in pooled.items():
            values = rewards[start : start + len(refs)]
            start += len(refs)
            level = values.mean() if self.statistic == "mean" else torch.quantile(values, self.quantile)
            self.reference[prompt] = float(level)
        return self

    def reference_for(self, prompt: str) -> float:
        """r_ref(prompt); a KeyError naming the prompt if there is none."""
        level = self.reference.get(prompt, self.default_reference)
        if level is None:
            raise KeyError(
                f"{self.name} has no reference level for prompt {prompt[:80]!r}: "
                "call fit_reference with reference completions for it, or pass reference="
            )
        return level

    def _score(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        ref = torch.tensor([self.reference_for(p) for p in prompts], dtype=torch.float64)
        r = self.reward.score(prompts, completions).double()
        return F.logsigmoid(r - ref)
