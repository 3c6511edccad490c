"""Torch reference of the fused step: mix policy and guide scores, truncate, draw one token per row.

For each row b, with policy scores s, guide scores g_i and weights w[b, i]:

    z[v]    = s[v] / T_b + sum_i w[b, i] * g_i[v]
    logp[v] = z[v] - logsumexp(z)
    logp    = top-k, then top-p, then min-p on logp, each renormalising what it keeps
    token   = argmax(logp)                    (greedy rows)
            = inverse CDF of exp(logp) at u   (u = row_uniform(seed, step))
            = argmax(logp + noise)            (when Gumbel noise is supplied: the kernels' test path)

A per-row constant added to any input cancels in logsumexp, so the policy and the guides may be
raw logits or log-probs alike: the sampled distribution and `logp` are the same.

This is the CPU path behind `kernels.sample_next` and the oracle the Triton kernel is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .rows import SamplingRows, row_uniform


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprob: torch.Tensor  # [B] float32: log-prob of the drawn token under the (truncated) mixed law
    logprobs: torch.Tensor | None = None  # [B, V] float32, only when asked


def mix_scores(
    policy: torch.Tensor,
    guides: Sequence[torch.Tensor] = (),
    weights: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = policy / T + sum_i w_i * guide_i in fp32.

    -inf in a guide masks the token whatever the sign of its weight (a negative weight must not turn a
    mask into +inf), and a weight of 0 ignores its guide altogether, even where it is -inf."""
    z = policy.float()
    if temperature is not None:
        z = z / temperature.to(z.dtype).unsqueeze(-1)
    neg_inf = torch.tensor(float("-inf"), device=z.device)
    for i, g in enumerate(guides):
        w = weights[:, i].to(z.dtype).unsqueeze(-1)
        g = g.float()
        term = torch.where(g == neg_inf, neg_inf, w * g)
        z = z + torch.where(w == 0, torch.zeros_like(term), term)
    return z


def _log_normalise(z: torch.Tensor) -> torch.Tensor:
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    # A fully masked row (every score -inf) stays all -inf instead of turning into NaN; a NaN stays NaN
    # so the loop can name it.
    return torch.where(lse == float("-inf"), torch.full_like(z, float("-inf")), z - lse)


def truncate(logp: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Apply top-k, top-p and min-p (each only on rows that set it) and renormalise.

    top-k keeps every token tied with the k-th largest; top-p keeps a token when the mass of the tokens
    strictly ahead of it in descending order is below p (so at least one token always survives).
    """
    neg_inf = torch.tensor(float("-inf"), dtype=logp.dtype, device=logp.device)
    vocab = logp.shape[-1]
    k_rows = (top_k > 0) & (top_k < vocab)
    if bool(k_rows.any()):
        k_max = int(top_k[k_rows].max())
        kth = logp.topk(k_max, dim=-1).values
        idx = (top_k.clamp(1, k_max) - 1).unsqueeze(-1)
        thresh = kth.gather(-1, idx)
        drop = (logp < thresh) & k_rows.unsqueeze(-1)
        logp = _log_normalise(torch.where(drop, neg_inf, logp))
    p_rows = top_p < 1
    if bool(p_rows.any()):
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = (mass_before >= top_p.unsqueeze(-1)) & p_rows.unsqueeze(-1)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = _log_normalise(torch.where(drop, neg_inf, logp))
    m_rows = min_p > 0
    if bool(m_rows.any()):
        top = logp.max(dim=-1, keepdim=True).values
        drop = (logp < top + torch.log(min_p).unsqueeze(-1)) & m_rows.unsqueeze(-1)
        logp = _log_normalise(torch.where(drop, neg_inf, logp))
    return logp


def inverse_cdf_sample(logp: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval contains u; zero-probability tokens have empty intervals."""
    cdf = logp.double().exp().cumsum(-1)
    target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logp.shape[-1] - 1)


def mix_and_sample_reference(
    policy: torch.Tensor,
    guides: Sequence[torch.Tensor],
    weights: torch.Tensor | None,
    rows: SamplingRows,
    step: torch.Tensor | int,
    noise: torch.Tensor | None = None,
    return_logprobs: bool = False,
) -> SampleOutput:
    z = mix_scores(policy, guides, weights, rows.temperature)
    logp = _log_normalise(z)
    if rows.any_filter:
        logp = truncate(logp, rows.top_k, rows.top_p, rows.min_p)
    greedy_tok = logp.argmax(-1)
    if noise is not None:
        drawn = (logp + noise.float()).argmax(-1)
    else:
        drawn = inverse_cdf_sample(logp, row_uniform(rows.seed, step))
    tokens = torch.where(rows.greedy, greedy_tok, drawn)
    logprob = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return SampleOutput(tokens=tokens, logprob=logprob, logprobs=logp if return_logprobs else None)
