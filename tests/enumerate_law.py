"""Exact laws of a tiny policy, by enumeration: the oracle of the sequence-level samplers' tests."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from align_decode.rewards import SequenceReward


_PROBS: dict = {}


def next_token_probs(model, seq, temperature: float = 1.0) -> torch.Tensor:
    """Next-token law after `seq`, from scratch (memoised: enumerations ask for the same prefixes often)."""
    key = (id(model), tuple(seq), temperature)
    if key not in _PROBS:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([list(seq)])).logits[0, -1].double()
        _PROBS[key] = torch.softmax(logits / temperature, -1)
    return _PROBS[key]


def response_law(model, prompt, cap: int, eos: int, temperature: float = 1.0) -> dict[tuple, float]:
    """p(y | prompt) for every response of at most `cap` tokens (a response ends at EOS or at the cap)."""
    law = {}

    def expand(resp, prob):
        if len(resp) == cap or (resp and resp[-1] == eos):
            law[tuple(resp)] = prob
            return
        p = next_token_probs(model, list(prompt) + resp, temperature)
        for tok in range(p.shape[0]):
            expand(resp + [tok], prob * float(p[tok]))

    expand([], 1.0)
    return law


def suffix_law(model, prompt, prefix, cap: int, eos: int, temperature: float = 1.0) -> dict[tuple, float]:
    """p(suffix | prompt, prefix) for every suffix completing `prefix` to a response (>= 1 new token)."""
    law = {}

    def expand(resp, prob):
        if len(resp) > len(prefix) and (len(resp) == cap or resp[-1] == eos):
            law[tuple(resp[len(prefix):])] = prob
            return
        p = next_token_probs(model, list(prompt) + resp, temperature)
        for tok in range(p.shape[0]):
            expand(resp + [tok], prob * float(p[tok]))

    expand(list(prefix), 1.0)
    return law


class TableReward(SequenceReward):
    """A reward looked up by the response's token ids (the tests' exact reward)."""

    name = "table"

    def __init__(self, table: dict[tuple, float]):
        self.table = table

    def score_ids(self, prompt_ids, completion_ids):
        return torch.tensor([self.table[tuple(c)] for c in completion_ids])

    def _score(self, prompts, completions):
        raise AssertionError("the table reward reads token ids")


def chi_square_p(counts: dict, law: dict, total: int) -> float:
    """Chi-square p-value of observed counts against a law, pooling cells expected below 5."""
    keys = sorted(law, key=lambda k: -law[k])
    obs, exp = [], []
    pool_o = pool_e = 0.0
    for k in keys:
        e = law[k] * total
        if e < 5:
            pool_o, pool_e = pool_o + counts.get(k, 0), pool_e + e
        else:
            obs.append(counts.get(k, 0))
            exp.append(e)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    assert sum(counts.get(k, 0) for k in counts if k not in law) == 0, "a draw outside the law's support"
    exp_t = torch.tensor(exp, dtype=torch.float64)
    exp_t = exp_t * sum(obs) / exp_t.sum()
    return float(chisquare(obs, exp_t.numpy()).pvalue)


def bon_law(law, table, n):
    """The exact law of best-of-n with first-index ties, for a policy law and a reward table:
    P(y) = p(y) / p(S_r(y)) * (F(r(y))^n - F-(r(y))^n)."""
    out = {}
    for y, p in law.items():
        r = table[y]
        level = sum(q for z, q in law.items() if table[z] == r)
        below_eq = sum(q for z, q in law.items() if table[z] <= r)
        below = sum(q for z, q in law.items() if table[z] < r)
        out[y] = p / level * (below_eq**n - below**n)
    return out
