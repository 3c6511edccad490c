"""The benchmark's metrics, as pure functions of rewards, token log-probs and texts.

KL to the policy, KL(q || p) with q the method's law over responses and p the policy's at T = 1:

- token-level methods (GenARM, controlled decoding, ARGS, Transfer Q*): the law each token was drawn
  from is known, so  sum_t [log q(y_t | x, y_<t) - log p(y_t | x, y_<t)]  over a response drawn from q
  is an unbiased estimate of KL(q || p) for the whole response; averaged over responses.
- best-of-N: the analytic value log N - (N - 1) / N (Beirami et al., 2024). It is an upper bound, and
  exact when rewards do not tie, which almost never happens with these continuous rewards.
- QAlign: the KL of its target pi_beta ∝ p exp(r / beta), which the chain approaches as steps grow:
  KL = E_pi[r] / beta - log E_p[exp(r / beta)], both expectations estimated per prompt from plain
  samples of the policy (self-normalised importance weights for E_pi). Small pools make log E_p too
  low, so this errs on the high side.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); SE is 0 for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_se needs at least one value")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def win_rate(method: Sequence[float], baseline: Sequence[float]) -> float:
    """P(method's reward > baseline's) over paired responses (same prompt, same sample index); a tie
    counts one half."""
    a, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"win_rate needs two non-empty lists of the same length, got {a.size} and {b.size}")
    return float(((a > b) + 0.5 * (a == b)).mean())


def sequence_kl(method_logprobs: Sequence[Sequence[float]], policy_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """Per response, sum_t (log q - log p) over its tokens (see the module docstring)."""
    if len(method_logprobs) != len(policy_logprobs):
        raise ValueError(f"{len(method_logprobs)} method rows but {len(policy_logprobs)} policy rows")
    out = []
    for q, p in zip(method_logprobs, policy_logprobs):
        if len(q) != len(p):
            raise ValueError(f"a response has {len(q)} method log-probs but {len(p)} policy log-probs")
        out.append(float(np.sum(np.asarray(q, dtype=np.float64) - np.asarray(p, dtype=np.float64))))
    return out


def best_of_n_kl(n: int) -> float:
    """log N - (N - 1) / N: KL(best-of-N || p) for rewards without ties."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return math.log(n) - (n - 1) / n


def tilted_kl(pool_rewards: Sequence[float], beta: float) -> float:
    """KL(pi_beta || p) for pi_beta ∝ p exp(r / beta), from rewards of samples of p (one prompt)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    z = np.asarray(pool_rewards, dtype=np.float64) / beta
    if z.size == 0:
        raise ValueError("tilted_kl needs at least one sample")
    log_mean_exp = np.logaddexp.reduce(z) - math.log(z.size)
    w = np.exp(z - np.logaddexp.reduce(z))
    return float(max(0.0, (w * z).sum() - log_mean_exp))


def words(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (lowercased words): 1 means no n-gram repeats
    anywhere in the set, small values mean the method keeps saying the same things."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams: Counter = Counter()
    for t in texts:
        w = words(t)
        grams.update(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def perplexity(policy_logprobs: Sequence[Sequence[float]]) -> float:
    """exp(-mean token log-prob under the policy), pooled over every token of every response."""
    total = sum(len(lp) for lp in policy_logprobs)
    if total == 0:
        return float("nan")
    return float(math.exp(-sum(float(np.sum(lp)) for lp in policy_logprobs) / total))
