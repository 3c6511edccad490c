"""The torch reference of the mix-and-sample step: its law, truncation and random stream."""

import math

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from align_decode.kernels import SamplingRows, derive_seeds, mix_scores, row_uniform, sample_next
from align_decode.kernels.reference import truncate


def _rows(b, **kw):
    return SamplingRows.build(b, **kw)


def test_mix_matches_formula_and_is_shift_invariant():
    g = torch.Generator().manual_seed(0)
    pol, a1, a2 = (torch.randn(3, 50, generator=g) * 3 for _ in range(3))
    w = torch.tensor([[0.5, 2.0], [1.0, 0.0], [0.0, 0.3]])
    rows = _rows(3, temperature=[0.7, 1.0, 1.3], greedy=False)
    out = sample_next(pol, [a1, a2], w, rows, step=0, return_logprobs=True)
    t = torch.tensor([0.7, 1.0, 1.3]).unsqueeze(-1)
    expect = torch.log_softmax(
        torch.log_softmax(pol, -1) / t + w[:, :1] * torch.log_softmax(a1, -1) + w[:, 1:] * torch.log_softmax(a2, -1), -1
    )
    torch.testing.assert_close(out.logprobs, expect, atol=1e-5, rtol=0)
    # Adding any per-row constant to any input leaves the law and the draw unchanged.
    shifted = sample_next(pol + 11.0, [a1 - 4.0, a2 + torch.randn(3, 1, generator=g) * 9], w, rows, step=0,
                          return_logprobs=True)
    torch.testing.assert_close(shifted.logprobs, out.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(shifted.tokens, out.tokens)


def test_minus_inf_in_a_guide_masks_for_any_nonzero_weight_and_weight_zero_ignores_it():
    pol = torch.randn(3, 10)
    guide = torch.randn(3, 10)
    guide[:, 3] = float("-inf")
    w = torch.tensor([[0.0], [1.0], [-2.0]])
    out = sample_next(pol, [guide], w, _rows(3), step=0, return_logprobs=True)
    assert torch.isfinite(out.logprobs[0]).all()
    assert out.logprobs[1, 3] == float("-inf") and out.logprobs[2, 3] == float("-inf")
    assert not torch.isnan(out.logprobs).any()
    keep = torch.arange(10) != 3
    expect = torch.log_softmax(torch.log_softmax(pol[2], -1)[keep] - 2.0 * guide[2, keep], -1)
    torch.testing.assert_close(out.logprobs[2, keep], expect)


@pytest.mark.parametrize(
    "kind,value",
    [("top_k", 1), ("top_k", 5), ("top_k", 17), ("top_p", 0.3), ("top_p", 0.9), ("min_p", 0.05), ("min_p", 0.3)],
)
def test_truncation_keeps_the_same_tokens_as_transformers_warpers(kind, value):
    torch.manual_seed(1)
    scores = torch.randn(4, 40) * 2
    logp = torch.log_softmax(scores, -1)
    warper = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "min_p": MinPLogitsWarper}[kind](value)
    kept_hf = torch.isfinite(warper(None, logp.clone()))
    args = {"top_k": torch.zeros(4, dtype=torch.long), "top_p": torch.ones(4), "min_p": torch.zeros(4)}
    args[kind] = torch.full((4,), value, dtype=args[kind].dtype)
    ours = truncate(logp, **args)
    assert torch.equal(torch.isfinite(ours), kept_hf)
    # What is kept is renormalised.
    torch.testing.assert_close(ours.exp().sum(-1), torch.ones(4))


def test_truncation_is_per_row():
    logp = torch.log_softmax(torch.randn(3, 30), -1)
    out = truncate(logp, torch.tensor([0, 3, 0]), torch.tensor([1.0, 1.0, 0.5]), torch.zeros(3))
    assert torch.isfinite(out[0]).all()
    assert int(torch.isfinite(out[1]).sum()) == 3
    assert 1 <= int(torch.isfinite(out[2]).sum()) < 30


def test_greedy_rows_take_the_argmax_and_ignore_temperature():
    pol = torch.randn(3, 20)
    rows = _rows(3, greedy=[True, False, True], temperature=0.5, seed=[1, 2, 3])
    out = sample_next(pol, rows=rows, step=0, return_logprobs=True)
    assert out.tokens[0] == pol[0].argmax() and out.tokens[2] == pol[2].argmax()
    torch.testing.assert_close(out.logprobs[0], torch.log_softmax(pol[0], -1))


def test_sampled_tokens_follow_the_mixed_law_chi_square():
    torch.manual_seed(0)
    vocab, draws = 12, 40000
    pol = torch.randn(1, vocab) * 1.5
    guide = torch.randn(1, vocab)
    w = torch.tensor([[0.8]])
    law = torch.softmax(pol / 0.9 + 0.8 * guide, -1)[0]
    rows = _rows(draws, temperature=0.9, top_k=0, seed=torch.arange(draws))
    out = sample_next(pol.expand(draws, -1), [guide.expand(draws, -1)], w.expand(draws, 1), rows, step=0)
    counts = torch.bincount(out.tokens, minlength=vocab).double()
    stat, p = chisquare(counts.numpy(), (law.double() * draws).numpy())
    assert p > 1e-3, (stat, p)


def test_masked_tokens_are_never_drawn_and_fully_masked_rows_do_not_nan():
    pol = torch.randn(2000, 30)
    pol[:, ::2] = float("-inf")
    out = sample_next(pol, rows=_rows(2000, seed=torch.arange(2000)), step=3)
    assert bool((out.tokens % 2 == 1).all())
    dead = torch.full((2, 30), float("-inf"))
    res = sample_next(dead, rows=_rows(2), step=0, return_logprobs=True)
    assert not torch.isnan(res.logprobs).any() and not torch.isnan(res.logprob).any()


def test_a_rows_draw_depends_only_on_its_seed_and_step():
    torch.manual_seed(0)
    pol = torch.randn(1, 1000)
    alone = sample_next(pol, rows=_rows(1, seed=[42]), step=7).tokens
    crowd = torch.cat([torch.randn(5, 1000), pol, torch.randn(3, 1000)])
    seeds = torch.tensor([1, 2, 3, 4, 5, 42, 6, 7, 8])
    batched = sample_next(crowd, rows=_rows(9, seed=seeds), step=7).tokens
    assert batched[5] == alone[0]
    u = row_uniform(torch.tensor([42, 42, 43]), torch.tensor([7, 8, 7]))
    assert len(set(u.tolist())) == 3 and bool(((u >= 0) & (u < 1)).all())


def test_row_uniform_is_uniform_and_child_seeds_differ():
    u = row_uniform(torch.arange(50000), 0)
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    _, p = chisquare(counts.numpy())
    assert p > 1e-3
    kids = derive_seeds(torch.tensor(5).expand(100), torch.arange(100))
    assert len(set(kids.tolist())) == 100


def test_supplied_noise_gives_gumbel_max():
    g = torch.Generator().manual_seed(3)
    pol = torch.randn(4, 25, generator=g)
    noise = -torch.log(-torch.log(torch.rand(4, 25, generator=g)))
    out = sample_next(pol, rows=_rows(4), step=0, noise=noise)
    assert torch.equal(out.tokens, (torch.log_softmax(pol, -1) + noise).argmax(-1))


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
    ],
)
def test_bad_rows_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingRows.build(2, **kw)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="weights"):
        sample_next(torch.randn(2, 5), [torch.randn(2, 5)], None)
    with pytest.raises(ValueError, match="guide 0"):
        sample_next(torch.randn(2, 5), [torch.randn(2, 6)], torch.ones(2, 1))


def test_mix_scores_temperature_only_scales_policy():
    pol, g = torch.randn(1, 5), torch.randn(1, 5)
    z = mix_scores(pol, [g], torch.tensor([[2.0]]), torch.tensor([4.0]))
    torch.testing.assert_close(z, pol / 4 + 2 * g)
    assert math.isclose(float(SamplingRows.build(1, greedy=True, temperature=0.2).temperature), 1.0)
