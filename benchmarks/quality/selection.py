"""Best-of-N, majority vote and weighted majority vote read off one pool of samples per prompt.

Best-of-N exactly, by order statistics. A pool holds M samples of a prompt with proxy scores r_i and
judge scores j_i. Best-of-N draws N of them without replacement (every N-subset equally likely), keeps
the one with the largest proxy and breaks ties uniformly at random (the package's BestOfN keeps the first
of tied candidates, which is the same thing for exchangeable draws). Group the pool by proxy value,
v_1 < ... < v_G with c_g samples each and mean judge jbar_g, and let L_g = c_1 + ... + c_g. The kept
sample's proxy is v_g exactly when all N draws lie in the first g groups but not all in the first g - 1:

    P(max = v_g) = [C(L_g, N) - C(L_g - c_g, N)] / C(M, N)

and, given that, the kept sample is uniform among the drawn members of group g, which by symmetry is
uniform over group g itself. So

    E[proxy of best-of-N] = sum_g P(max = v_g) v_g,    E[judge of best-of-N] = sum_g P(max = v_g) jbar_g,

exact for the pool's empirical law, for every N <= M at once, with no re-generation per N.

Majority votes group samples by their text (spaces collapsed) and are estimated by Monte Carlo over
random N-subsets of the pool (the vote is not a function of order statistics): majority keeps the most
frequent text (the first drawn wins ties), weighted majority the text with the largest sum of
softmax(r / beta) weights; the kept sample is that group's first drawn member.

Confidence intervals: a two-level bootstrap, prompts resampled with replacement and, inside each,
the pool resampled with replacement (so the interval covers both which prompts were asked and which
samples the pool happened to draw).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def _log_comb_table(m: int) -> np.ndarray:
    """log k! for k = 0..m."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, m + 1, dtype=np.float64)))])


def best_of_n_probabilities(proxy: Sequence[float], ns: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(values [G], P [len(ns), G]): the distinct proxy values in increasing order and, for each N, the
    probability that best-of-N keeps a sample of each value."""
    r = np.asarray(proxy, dtype=np.float64)
    m = r.size
    if m == 0:
        raise ValueError("the pool is empty")
    values, counts = np.unique(r, return_counts=True)
    upto = np.cumsum(counts)
    below = upto - counts
    lf = _log_comb_table(m)
    out = np.zeros((len(ns), values.size))
    for k, n in enumerate(ns):
        if not 1 <= n <= m:
            raise ValueError(f"N must be in 1..{m} (the pool's size), got {n}")

        def ratio(a):  # C(a, n) / C(m, n), 0 where a < n
            ok = a >= n
            res = np.zeros(a.shape)
            aa = a[ok]
            res[ok] = np.exp(lf[aa] - lf[aa - n] - lf[m] + lf[m - n])
            return res

        out[k] = ratio(upto) - ratio(below)
    return values, out


def best_of_n_curve(proxy: Sequence[float], judge: Sequence[float], ns: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(E[proxy], E[judge]) of best-of-N for each N in ns, exact for the pool (module docstring)."""
    r = np.asarray(proxy, dtype=np.float64)
    j = np.asarray(judge, dtype=np.float64)
    if r.shape != j.shape:
        raise ValueError(f"{r.size} proxy scores but {j.size} judge scores")
    values, p = best_of_n_probabilities(r, ns)
    group = np.searchsorted(values, r)
    jbar = np.bincount(group, weights=j, minlength=values.size) / np.bincount(group, minlength=values.size)
    return p @ values, p @ jbar


def best_of_n_brute_force(proxy: Sequence[float], judge: Sequence[float], n: int) -> tuple[float, float]:
    """The same expectation by enumerating every N-subset and every tied winner (tests only: tiny pools)."""
    from itertools import combinations

    r, j = list(map(float, proxy)), list(map(float, judge))
    total_r = total_j = 0.0
    subsets = list(combinations(range(len(r)), n))
    for subset in subsets:
        top = max(r[i] for i in subset)
        winners = [i for i in subset if r[i] == top]
        total_r += top
        total_j += sum(j[i] for i in winners) / len(winners)
    return total_r / len(subsets), total_j / len(subsets)


def text_key(text: str) -> str:
    return " ".join(text.split())


def vote_curves(texts: Sequence[str], proxy: Sequence[float], judge: Sequence[float], ns: Sequence[int],
                beta: float, draws: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Monte-Carlo E[judge] and E[proxy] of majority and weighted-majority votes over random N-subsets
    of one prompt's pool, for each N in ns: {"majority_judge", "majority_proxy", "weighted_judge", ...}."""
    keys = [text_key(t) for t in texts]
    ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    group = np.array([ids[k] for k in keys])
    r = np.asarray(proxy, dtype=np.float64)
    j = np.asarray(judge, dtype=np.float64)
    m = r.size
    res = {f"{v}_{s}": np.zeros(len(ns)) for v in ("majority", "weighted") for s in ("judge", "proxy")}
    for k, n in enumerate(ns):
        for _ in range(draws):
            pick = rng.choice(m, size=n, replace=False)
            g = group[pick]
            first = {}
            for pos, gg in enumerate(g):
                first.setdefault(int(gg), pos)
            uniq = np.array(list(first))
            counts = np.array([(g == u).sum() for u in uniq])
            maj = pick[first[int(uniq[int(np.argmax(counts))])]]  # argmax: the first seen wins ties
            w = np.exp((r[pick] - r[pick].max()) / beta)
            weights = np.array([w[g == u].sum() for u in uniq])
            wmv = pick[first[int(uniq[int(np.argmax(weights))])]]
            res["majority_judge"][k] += j[maj] / draws
            res["majority_proxy"][k] += r[maj] / draws
            res["weighted_judge"][k] += j[wmv] / draws
            res["weighted_proxy"][k] += r[wmv] / draws
    return res


def distinct_share(texts: Sequence[str]) -> float:
    """Distinct texts (spaces collapsed) over all texts: 1 means no two samples could be grouped."""
    return len({text_key(t) for t in texts}) / len(texts) if texts else float("nan")


def bootstrap_best_of_n(pools: Sequence[tuple[Sequence[float], Sequence[float]]], ns: Sequence[int],
                        reps: int, rng: np.random.Generator, level: float = 0.95) -> dict[str, np.ndarray]:
    """Mean over prompts of best-of-N's E[proxy] and E[judge] for each N, with a two-level bootstrap
    interval (module docstring). pools: one (proxy, judge) pair of arrays per prompt."""
    if not pools:
        raise ValueError("no pools")
    curves = np.array([np.stack(best_of_n_curve(r, j, ns)) for r, j in pools])  # [P, 2, len(ns)]
    mean = curves.mean(0)
    boot = np.zeros((reps, 2, len(ns)))
    arrays = [(np.asarray(r, dtype=np.float64), np.asarray(j, dtype=np.float64)) for r, j in pools]
    for b in range(reps):
        chosen = rng.integers(0, len(arrays), len(arrays))
        acc = np.zeros((2, len(ns)))
        for p in chosen:
            r, j = arrays[p]
            idx = rng.integers(0, r.size, r.size)
            acc += np.stack(best_of_n_curve(r[idx], j[idx], ns))
        boot[b] = acc / len(chosen)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    # The bootstrap SE of the difference between each N and the best N of the judge curve, for the reading
    # "does the judge turn down": P(judge at N < judge at the best smaller N) over bootstrap replicates.
    return {"proxy": mean[0], "judge": mean[1], "proxy_lo": lo[0], "proxy_hi": hi[0], "judge_lo": lo[1],
            "judge_hi": hi[1], "boot_judge": boot[:, 1], "per_prompt_judge": curves[:, 1],
            "per_prompt_proxy": curves[:, 0]}


def mean_ci(values: Sequence[float], reps: int, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap interval of a mean."""
    x = np.asarray(values, dtype=np.float64)
    boots = x[rng.integers(0, x.size, (reps, x.size))].mean(1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def log_spaced(m: int) -> list[int]:
    """1, 2, 4, ... up to m, m included."""
    ns, n = [], 1
    while n < m:
        ns.append(n)
        n *= 2
    return ns + [m]


__all__ = ["best_of_n_brute_force", "best_of_n_curve", "best_of_n_probabilities", "bootstrap_best_of_n",
           "distinct_share", "log_spaced", "mean_ci", "text_key", "vote_curves"]
_ = math  # math kept for callers that import it from here
