"""The Triton mix-and-sample kernel (`kernels.triton_mix`) against the torch reference.

Three groups of tests live here:

* Interpreter tests (decorated `@interpreted`) run the kernel on CPU tensors under TRITON_INTERPRET=1.
  Triton fixes interpreter mode when it is first imported, and by the time this file runs another test
  may have imported it compiled; so a normal run starts one child pytest on this file with
  TRITON_INTERPRET=1 (about half a minute) and each interpreter test here reports its child's outcome.
  A run that already has TRITON_INTERPRET=1 set runs them in-process.
* Host-side tests: argument checks and dispatch; no kernel launch.
* GPU tests (`@pytest.mark.gpu`): the compiled kernel, skipped without CUDA.

Shapes are small (the interpreter costs ~30 ms per program), with vocabularies that are not multiples of
the block and rows split over several programs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from align_decode.errors import AlignDecodeWarning
from align_decode.kernels import SamplingRows, sample_next
from align_decode.kernels.reference import mix_and_sample_reference

ROOT = Path(__file__).resolve().parents[2]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
NEG_INF = float("-inf")

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed: pip install 'align-decode[triton]'")
compiled_only = pytest.mark.skipif(IN_INTERPRETER, reason="checks the compiled (non-interpreter) import")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or IN_INTERPRETER or not HAVE_TRITON,
    reason="needs a CUDA GPU, triton, and TRITON_INTERPRET unset")


# --------------------------------------------------------------------------------------------------------
# Running the interpreter tests in a child process
# --------------------------------------------------------------------------------------------------------

_INTERPRETED: list[str] = []


def interpreted(test):
    """Mark `test` as an interpreter test: the real test in an interpreted process, else a proxy that
    reports the outcome of the same test in the child run."""
    _INTERPRETED.append(test.__name__)
    if IN_INTERPRETER:
        return needs_triton(test)

    def proxy(interpreter_run):
        interpreter_run.report(test.__name__)

    proxy.__name__ = proxy.__qualname__ = test.__name__
    proxy.__doc__ = test.__doc__
    return needs_triton(proxy)


class ChildRun:
    """Outcomes of the child pytest run, read from its JUnit XML report."""

    def __init__(self, report: Path, proc: subprocess.CompletedProcess):
        self.output = (proc.stdout + proc.stderr)[-6000:]
        self.cases: dict[str, ET.Element] = {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                self.cases[case.get("name")] = case

    def report(self, name: str) -> None:
        mine = {k: v for k, v in self.cases.items() if k == name or k.startswith(name + "[")}
        if not mine:
            pytest.fail(f"{name} did not run in the interpreter child; its output:\n{self.output}")
        problems = []
        for case_name, case in mine.items():
            for tag in ("failure", "error"):
                found = case.find(tag)
                if found is not None:
                    problems.append(f"{case_name} ({tag}):\n{found.text or found.get('message', '')}")
        if problems:
            pytest.fail("under TRITON_INTERPRET=1:\n" + "\n\n".join(problems), pytrace=False)
        if all(v.find("skipped") is not None for v in mine.values()):
            pytest.skip(next(iter(mine.values())).find("skipped").get("message", "skipped in the child"))


@pytest.fixture(scope="module")
def interpreter_run(request, tmp_path_factory) -> ChildRun:
    # Run in the child only the interpreter tests this session selected (all of them in a full run).
    here = Path(__file__).resolve()
    wanted = sorted({item.name for item in request.session.items
                     if item.name in _INTERPRETED and Path(str(item.fspath)).resolve() == here})
    report = tmp_path_factory.mktemp("triton_interpreter") / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", str(here), "-q", "-p", "no:cacheprovider",
           f"--junitxml={report}", "-k", " or ".join(wanted or _INTERPRETED)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return ChildRun(report, proc)


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def kernel(*args, **kwargs):
    from align_decode.kernels.triton_mix import mix_and_sample_triton

    return mix_and_sample_triton(*args, **kwargs)


def scores(batch: int, vocab: int, n_guides: int, dtype=torch.float32, seed: int = 0, device="cpu"):
    """Random policy logits (spread like an LM's), guide log-probs and per-row weights."""
    gen = torch.Generator().manual_seed(seed)
    policy = (3 * torch.randn(batch, vocab, generator=gen)).to(dtype)
    guides = [torch.log_softmax(2 * torch.randn(batch, vocab, generator=gen), -1).to(dtype) for _ in range(n_guides)]
    weights = torch.rand(batch, n_guides, generator=gen) * 2
    return policy.to(device), [g.to(device) for g in guides], weights.to(device)


def gumbel(batch: int, vocab: int, seed: int, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, vocab, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return (-torch.log(-torch.log(u))).float().to(device)


def assert_same_draw(out, ref, atol: float = 1e-5, untruncated=None):
    """Same tokens, log-probs within atol, and (when returned) the same kept set and log-probs.

    untruncated: the reference's full log-probs without filters. When given, the kernel may also keep
    tokens exactly tied with the reference's last kept one (top-p keeps every token tied at the cut,
    the reference's sort keeps some of them: ties are common with bf16 scores); nothing else."""
    assert out.tokens.dtype == torch.int64 and out.logprob.dtype == torch.float32
    assert torch.equal(out.tokens.cpu(), ref.tokens.cpu()), \
        f"kernel {out.tokens.tolist()} vs reference {ref.tokens.tolist()}"
    assert not out.logprob.isnan().any()
    torch.testing.assert_close(out.logprob.cpu(), ref.logprob.cpu(), atol=atol, rtol=0)
    if ref.logprobs is not None:
        kept, ref_kept = out.logprobs.isfinite().cpu(), ref.logprobs.isfinite().cpu()
        if untruncated is not None:
            full = untruncated.cpu()
            assert not (ref_kept & ~kept).any(), "the kernel dropped a token the reference keeps"
            last = torch.where(ref_kept, full, float("inf")).min(dim=1, keepdim=True).values
            extra = kept & ~ref_kept
            assert torch.equal(full[extra], last.expand_as(full)[extra]), "an extra kept token is not a tie"
            assert not out.logprobs.isnan().any()
            torch.testing.assert_close(out.logprobs.cpu()[ref_kept], ref.logprobs.cpu()[ref_kept], atol=atol, rtol=0)
            return
        assert torch.equal(kept, ref_kept), \
            f"kept per row: kernel {kept.sum(1).tolist()}, reference {ref_kept.sum(1).tolist()}"
        assert not out.logprobs.isnan().any()
        torch.testing.assert_close(out.logprobs.cpu(), ref.logprobs.cpu(), atol=atol, rtol=0)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    stats = pytest.importorskip("scipy.stats")
    expected = probs.double() * counts.sum()
    statistic = float(((counts.double() - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(statistic, df=len(counts) - 1))


# --------------------------------------------------------------------------------------------------------
# Interpreter tests: the kernel's law, token by token
# --------------------------------------------------------------------------------------------------------

DRAW_CASES = {
    # name: (batch, vocab, guides, dtype, block, splits)
    "fp32-no-guide-V1000-block256": (3, 1000, 0, torch.float32, 256, 1),
    "bf16-two-guides-V3000-three-splits": (4, 3000, 2, torch.bfloat16, 512, 3),
    "fp32-one-guide-V4099-two-splits": (3, 4099, 1, torch.float32, 1024, 2),
}


@interpreted
@pytest.mark.parametrize("case", list(DRAW_CASES))
def test_supplied_noise_picks_the_reference_token(case):
    """With the same Gumbel noise the kernel draws the reference's token, with its log-prob, and returns
    the reference's full log-probs; masks (-inf in the policy or a weighted guide) stay masked."""
    batch, vocab, n_guides, dtype, block, splits = DRAW_CASES[case]
    policy, guides, weights = scores(batch, vocab, n_guides, dtype, seed=1)
    policy[0, ::7] = NEG_INF
    if n_guides:
        guides[0][1, 3::5] = NEG_INF
        weights[0, 0] = 0.0  # a zero weight on some row
    temperature = [0.7, 1.0, 1.6, 0.9][:batch]
    rows = SamplingRows.build(batch, temperature=temperature, greedy=[False] * (batch - 1) + [True],
                              seed=list(range(batch)))
    noise = gumbel(batch, vocab, seed=2)
    out = kernel(policy, guides, weights, rows, 5, noise=noise, return_logprobs=True, block=block, splits=splits)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 5, noise=noise, return_logprobs=True)
    assert_same_draw(out, ref)
    assert out.logprobs[0, ::7].eq(NEG_INF).all()
    assert not torch.isin(out.tokens[0], torch.arange(0, vocab, 7))


TRUNCATION_ROWS = dict(  # one row per setting: top-k, top-p, min-p alone and combined, greedy, off
    top_k=[1, 7, 0, 0, 50, 0, 20, 10, 5000],
    top_p=[1.0, 1.0, 0.9, 1.0, 0.3, 1.0, 0.8, 0.5, 1.0],
    min_p=[0.0, 0.0, 0.0, 0.05, 0.0, 0.3, 0.02, 0.0, 0.0],
    greedy=[False] * 7 + [True, False],
)


@interpreted
@pytest.mark.parametrize("n_guides,splits", [(0, 1), (2, 3)])
def test_truncation_keeps_the_reference_set(n_guides, splits):
    """Per-row top-k / top-p / min-p keep exactly the reference's tokens and renormalise like it; the draw
    is the reference's. The last row sets top_k >= vocab, which keeps everything."""
    batch, vocab = 9, 3000
    policy, guides, weights = scores(batch, vocab, n_guides, seed=3)
    rows = SamplingRows.build(batch, temperature=0.8, seed=list(range(batch)), **TRUNCATION_ROWS)
    noise = gumbel(batch, vocab, seed=4)
    out = kernel(policy, guides, weights, rows, 0, noise=noise, return_logprobs=True, block=512, splits=splits)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 0, noise=noise, return_logprobs=True)
    assert_same_draw(out, ref)
    kept = out.logprobs.isfinite().sum(1)
    assert kept[0] == 1 and kept[1] == 7 and kept[-1] == vocab
    assert (kept[2:8] < vocab).all()  # the filters did cut


@interpreted
def test_top_k_keeps_ties_at_the_kth_value():
    """Scores quantised to a few levels tie a lot: every token tied with the k-th largest is kept."""
    batch, vocab = 4, 700
    gen = torch.Generator().manual_seed(5)
    policy = torch.randint(0, 12, (batch, vocab), generator=gen).float() / 2
    rows = SamplingRows.build(batch, top_k=[1, 10, 60, 333], seed=[1, 2, 3, 4])
    noise = gumbel(batch, vocab, seed=6)
    out = kernel(policy, [], None, rows, 0, noise=noise, return_logprobs=True)
    ref = mix_and_sample_reference(policy, [], None, rows, 0, noise=noise, return_logprobs=True)
    assert_same_draw(out, ref)
    assert (out.logprobs.isfinite().sum(1) > rows.top_k).all()  # ties made every row keep more than k


@interpreted
def test_greedy_rows_take_the_reference_argmax():
    """Greedy rows ignore the noise and take argmax(logp), the lowest token id among exact ties, next to
    sampled rows in the same batch; their log-prob is the reference's."""
    batch, vocab = 6, 1500
    policy, guides, weights = scores(batch, vocab, 1, seed=7)
    policy[1], guides[0][1] = 0.0, 0.0  # every token tied: token 0
    policy[2, [17, 900]] = 50.0  # two-way tie at the top: token 17
    guides[0][2, [17, 900]] = 0.0
    greedy = [True, True, True, False, True, False]
    rows = SamplingRows.build(batch, greedy=greedy, top_k=[0, 0, 0, 0, 40, 0], seed=list(range(batch)))
    out = kernel(policy, guides, weights, rows, 3, block=512, splits=2)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 3)
    is_greedy = torch.tensor(greedy)
    assert torch.equal(out.tokens[is_greedy], ref.tokens[is_greedy])
    assert out.tokens[1] == 0 and out.tokens[2] == 17
    torch.testing.assert_close(out.logprob[is_greedy], ref.logprob[is_greedy], atol=1e-5, rtol=0)


@interpreted
def test_zero_weight_guide_does_not_mask():
    """A guide at -inf masks its token where its weight is nonzero, negative included (never +inf), and
    not at all where its weight is 0 (the reference's 0 * -inf = 0)."""
    batch, vocab = 4, 800
    policy, guides, weights = scores(batch, vocab, 1, seed=8)
    top = policy.argmax(-1)
    guides[0][torch.arange(batch), top] = NEG_INF
    weights[:, 0] = torch.tensor([0.0, 0.5, 0.0, -0.5])
    rows = SamplingRows.build(batch, greedy=True)
    out = kernel(policy, guides, weights, rows, 0, return_logprobs=True)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 0, return_logprobs=True)
    assert_same_draw(out, ref)
    assert out.tokens[0] == top[0] and out.tokens[2] == top[2] and out.tokens[1] != top[1] and out.tokens[3] != top[3]
    assert out.logprobs[1, top[1]] == NEG_INF and out.logprobs[3, top[3]] == NEG_INF and out.logprobs[0, top[0]].isfinite()
    assert not torch.isnan(out.logprobs).any()


@interpreted
@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "top-k-top-p"])
def test_fully_masked_row_gives_no_nan(filtered):
    """A row with every token masked draws token 0 with log-prob -inf, like the reference, and no NaN
    appears; the other rows are untouched."""
    batch, vocab = 3, 600
    policy, guides, weights = scores(batch, vocab, 1, seed=9)
    policy[0] = NEG_INF  # masked by the policy
    guides[0][2] = NEG_INF  # masked by a weighted guide
    weights[2, 0] = 1.0
    rows = SamplingRows.build(batch, top_k=20 if filtered else 0, top_p=0.9 if filtered else 1.0, seed=[1, 2, 3])
    noise = gumbel(batch, vocab, seed=10)
    out = kernel(policy, guides, weights, rows, 0, noise=noise, return_logprobs=True, block=256, splits=2)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 0, noise=noise, return_logprobs=True)
    assert_same_draw(out, ref)
    own = kernel(policy, guides, weights, rows, 0, return_logprobs=True)  # the kernel's own draw
    for o in (out, own):
        assert o.tokens[[0, 2]].tolist() == [0, 0] and o.logprob[[0, 2]].eq(NEG_INF).all()
        assert o.logprobs[[0, 2]].eq(NEG_INF).all() and not o.logprobs.isnan().any()
        assert o.logprob[1].isfinite()


@interpreted
def test_masked_tokens_are_never_drawn():
    """Masked tokens are the most likely ones before masking and carry the largest noise, yet are never
    drawn, with supplied noise or the kernel's own inverse-CDF draw."""
    batch, vocab = 24, 300
    policy, guides, weights = scores(batch, vocab, 1, seed=11)
    masked = torch.zeros(batch, vocab, dtype=torch.bool)
    masked[:, ::3] = True
    policy[:, ::3] += 20.0  # would win almost every draw if the mask were ignored
    policy[masked[:, :] & (torch.arange(vocab) % 6 == 0)] = NEG_INF
    guides[0][masked & (torch.arange(vocab) % 6 == 3)] = NEG_INF
    weights[:, 0] = weights[:, 0].clamp(min=0.1)
    rows = SamplingRows.build(batch, seed=list(range(100, 100 + batch)))
    noise = gumbel(batch, vocab, seed=12).masked_fill(masked, 30.0)
    out = kernel(policy, guides, weights, rows, 1, noise=noise)
    assert_same_draw(out, mix_and_sample_reference(policy, guides, weights, rows, 1, noise=noise))
    own = kernel(policy, guides, weights, rows, 1)
    for o in (out, own):
        assert not masked.gather(1, o.tokens[:, None]).any()
        assert o.logprob.isfinite().all()


@interpreted
def test_in_kernel_noise_follows_the_mixed_law():
    """Chi-square: the kernel's own draws (inverse CDF, one uniform per seed) follow the mixed law
    softmax(policy / T + w * guide). The same counts reject the policy-only law and the law without
    temperature, so the test can tell them apart."""
    vocab, n = 6, 160  # expected counts >= 7 per token
    policy = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    guide = torch.tensor([-3.0, -2.0, -1.0, 0.0, 0.0, 0.5])
    temperature, weight = 0.5, 1.0
    rows = SamplingRows.build(n, temperature=temperature, seed=torch.arange(n) * 7919 + 13)
    out = kernel(policy.expand(n, vocab), [guide.expand(n, vocab)], torch.full((n, 1), weight), rows, 2)
    counts = torch.bincount(out.tokens, minlength=vocab)
    mixed = torch.softmax(policy / temperature + weight * guide, -1)
    assert chi_square_pvalue(counts, mixed) > 1e-3, counts.tolist()
    assert chi_square_pvalue(counts, torch.softmax(policy / temperature, -1)) < 1e-6
    assert chi_square_pvalue(counts, torch.softmax(policy + weight * guide, -1)) < 1e-6


@interpreted
def test_filtered_draws_stay_in_the_kept_set():
    """With the kernel's own draws, truncated rows draw only kept tokens, and report their truncated log-prob."""
    batch, vocab = 16, 500
    policy, guides, weights = scores(batch, vocab, 1, seed=13)
    rows = SamplingRows.build(batch, top_k=[0, 30] * 8, top_p=[0.7, 1.0] * 8, min_p=[0.0] * 12 + [0.1] * 4,
                              seed=list(range(batch)))
    out = kernel(policy, guides, weights, rows, 4)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 4, return_logprobs=True)
    drawn = ref.logprobs.gather(1, out.tokens[:, None]).squeeze(1)
    assert drawn.isfinite().all()
    torch.testing.assert_close(out.logprob, drawn, atol=1e-5, rtol=0)


@interpreted
def test_draw_depends_only_on_seed_and_step():
    """A row's draw is a function of (seed, step, scores): the same in any batch slot, next to any rows,
    with any block size or vocabulary split; a scalar step equals the same step per row; another step
    draws anew."""
    batch, vocab = 5, 2000
    policy, guides, weights = scores(batch, vocab, 1, seed=14)
    policy /= 10  # flat: draws vary
    policy[4], guides[0][4], weights[4] = policy[0], guides[0][0], weights[0]
    rows = SamplingRows.build(batch, seed=[11, 22, 33, 44, 11])
    base = kernel(policy, guides, weights, rows, 9)
    assert base.tokens[0] == base.tokens[4]  # same seed, same scores, other slot
    order = torch.tensor([3, 1, 4, 0, 2])
    shuffled = kernel(policy[order], [guides[0][order]], weights[order], rows.select(order), 9, block=256, splits=3)
    assert torch.equal(shuffled.tokens, base.tokens[order])
    alone = kernel(policy[2:3], [guides[0][2:3]], weights[2:3], rows.select(torch.tensor([2])), 9, block=1024)
    assert alone.tokens[0] == base.tokens[2]
    per_row = kernel(policy, guides, weights, rows, torch.full((batch,), 9))
    assert torch.equal(per_row.tokens, base.tokens)
    later = kernel(policy, guides, weights, rows, 10)
    assert not torch.equal(later.tokens, base.tokens)
    torch.testing.assert_close(shuffled.logprob, base.logprob[order], atol=1e-6, rtol=0)


@interpreted
def test_sample_next_implementations():
    """sample_next(implementation="triton") runs the kernel on CPU tensors under the interpreter;
    implementation="torch" is the reference; both draw the same tokens."""
    batch, vocab = 8, 500
    policy, guides, weights = scores(batch, vocab, 1, seed=15)
    policy /= 10
    rows = SamplingRows.build(batch, seed=list(range(batch)))
    from align_decode.kernels import triton_mix

    calls = []
    real = triton_mix.mix_and_sample_triton
    triton_mix.mix_and_sample_triton = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        fused = sample_next(policy, guides, weights, rows, 1, implementation="triton")
        assert len(calls) == 1
        plain = sample_next(policy, guides, weights, rows, 1, implementation="torch")
        assert len(calls) == 1
    finally:
        triton_mix.mix_and_sample_triton = real
    assert torch.equal(fused.tokens, kernel(policy, guides, weights, rows, 1).tokens)
    assert torch.equal(plain.tokens, mix_and_sample_reference(policy, guides, weights, rows, 1).tokens)
    # Both draw by inverse CDF at the same row_uniform: the same tokens (up to rounding at a CDF boundary).
    assert torch.equal(fused.tokens, plain.tokens)


if IN_INTERPRETER and HAVE_TRITON:  # a helper kernel that exposes the in-kernel uniform (interpreter runs only)
    import triton
    import triton.language as tl

    from align_decode.kernels.triton_mix import _row_uniform

    @triton.jit
    def _row_uniform_kernel(seed_ptr, step_ptr, out_ptr):
        i = tl.program_id(0)
        tl.store(out_ptr + i, _row_uniform(tl.load(seed_ptr + i), tl.load(step_ptr + i)))


@interpreted
def test_in_kernel_uniform_is_row_uniform():
    """The kernel's uniform is bitwise `rows.row_uniform(seed, step)` (SplitMix64 on the 64-bit seed and
    step), negative seeds and steps above 2^32 included."""
    from align_decode.kernels import row_uniform

    seeds = torch.tensor([0, 1, 42, -1, -(2**63), 2**63 - 1, 0x1234_5678_9ABC_DEF1, 7])
    steps = torch.tensor([0, 5, 7, 3, 1, 2**40 + 9, (7 << 32) + 5, 0])
    out = torch.empty(len(seeds), dtype=torch.float64)
    _row_uniform_kernel[(len(seeds),)](seeds, steps, out)
    assert torch.equal(out, row_uniform(seeds, steps))


INVERSE_CDF_CASES = {
    # name: (batch, vocab, guides, dtype, block, splits, filtered)
    "fp32-policy-only-one-tile": (16, 300, 0, torch.float32, None, 1, False),
    "fp32-one-guide-tiles-of-64-five-splits": (16, 500, 1, torch.float32, 64, 5, False),
    "bf16-two-guides-tiles-of-128": (12, 1000, 2, torch.bfloat16, 128, 3, False),
    "fp32-one-guide-truncated-split": (12, 700, 1, torch.float32, 128, 2, True),
}


@interpreted
@pytest.mark.parametrize("case", list(INVERSE_CDF_CASES))
def test_draws_are_the_reference_tokens(case):
    """Without supplied noise the kernel draws the reference's own token (inverse CDF at row_uniform(seed,
    step)) with its log-prob, whatever the tiling and split: plain, greedy, masked and truncated rows."""
    batch, vocab, n_guides, dtype, block, splits, filtered = INVERSE_CDF_CASES[case]
    policy, guides, weights = scores(batch, vocab, n_guides, dtype, seed=31)
    policy = policy / 3  # flatter rows: draws spread over many tokens and tiles
    policy[0, ::5] = NEG_INF
    settings = dict(temperature=torch.linspace(0.6, 1.4, batch).tolist(), seed=[1000 + 17 * i for i in range(batch)],
                    greedy=[i % 7 == 6 for i in range(batch)])
    if filtered:
        settings.update(top_k=[[0, 5, 1, 40, 0, 300][i % 6] for i in range(batch)],
                        top_p=[[0.9, 1.0, 1.0, 0.6, 0.95, 1.0][i % 6] for i in range(batch)],
                        min_p=[[0.0, 0.0, 0.0, 0.0, 0.02, 0.1][i % 6] for i in range(batch)])
    rows = SamplingRows.build(batch, **settings)
    out = kernel(policy, guides, weights, rows, 11, return_logprobs=True, block=block, splits=splits)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 11, return_logprobs=True)
    assert_same_draw(out, ref)
    assert len(set(out.tokens.tolist())) > batch // 2  # the draws do vary


@interpreted
def test_truncated_draws_do_not_depend_on_tiles_splits_or_slot():
    """Truncated rows too: the same token in any batch slot, with any tile size, split count or number of
    pivots per search pass (64 pivots: 6 passes per filter; 256: 4)."""
    batch, vocab = 6, 900
    policy, guides, weights = scores(batch, vocab, 1, seed=33)
    policy /= 4
    rows = SamplingRows.build(batch, top_k=[0, 50, 3, 0, 200, 0], top_p=[0.8, 1.0, 1.0, 0.5, 0.9, 1.0],
                              min_p=[0.0, 0.0, 0.0, 0.0, 0.0, 0.05], seed=[5, 6, 7, 8, 9, 10])
    base = kernel(policy, guides, weights, rows, 2, block=1024, splits=1)
    order = torch.tensor([4, 2, 0, 5, 1, 3])
    for block, splits, pivots in [(128, 3, 256), (256, 2, 64)]:
        again = kernel(policy[order], [guides[0][order]], weights[order], rows.select(order), 2, block=block,
                       splits=splits, pivots=pivots)
        assert torch.equal(again.tokens, base.tokens[order]), (block, splits, pivots)
        torch.testing.assert_close(again.logprob, base.logprob[order], atol=1e-5, rtol=0)
    assert torch.equal(base.tokens, mix_and_sample_reference(policy, guides, weights, rows, 2).tokens)


@interpreted
@pytest.mark.parametrize("splits", [1, 3])
def test_split_truncation_keeps_ties_like_the_reference(splits):
    """Scores on a few levels tie a lot: with the search split over programs, top-k keeps every token tied
    with the k-th, top-p every token tied at its cut (the reference's sort keeps some of them), min-p
    every token above its bound; the draws are the reference's where the kept sets agree."""
    batch, vocab = 8, 400
    gen = torch.Generator().manual_seed(35)
    policy = torch.randint(0, 10, (batch, vocab), generator=gen).float() / 3
    settings = dict(top_k=[1, 10, 45, 0, 0, 30, 0, 399], top_p=[1.0, 1.0, 1.0, 0.5, 0.9, 0.7, 1.0, 1.0],
                    min_p=[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0], seed=list(range(batch)))
    rows = SamplingRows.build(batch, **settings)
    noise = gumbel(batch, vocab, seed=36)
    out = kernel(policy, [], None, rows, 0, noise=noise, return_logprobs=True, block=64, splits=splits)
    ref = mix_and_sample_reference(policy, [], None, rows, 0, noise=noise, return_logprobs=True)
    full = mix_and_sample_reference(policy, [], None, SamplingRows.build(batch), 0, return_logprobs=True).logprobs
    kept = out.logprobs.isfinite()
    ref_kept = ref.logprobs.isfinite()
    assert not (ref_kept & ~kept).any(), "the kernel dropped a token the reference keeps"
    last = torch.where(ref_kept, full, float("inf")).min(dim=1, keepdim=True).values
    extra = kept & ~ref_kept
    assert torch.equal(full[extra], last.expand_as(full)[extra]), "an extra kept token is not a tie"
    top_k_rows = torch.tensor([0, 1, 2, 6, 7])  # top-k (alone) and min-p keep ties in both
    assert torch.equal(kept[top_k_rows], ref_kept[top_k_rows])
    assert (kept.sum(1)[[1, 2]] > torch.tensor([10, 45])).all()  # ties made the rows keep more than k
    assert torch.equal(out.tokens[top_k_rows], ref.tokens[top_k_rows])
    assert (kept.sum(1)[[3, 4, 5]] > ref_kept.sum(1)[[3, 4, 5]]).any()  # top-p kept a tie the sort dropped
    assert kept.gather(1, out.tokens[:, None]).all()
    own = kernel(policy, [], None, rows, 0, block=64, splits=splits)  # inverse CDF over the kept set
    assert kept.gather(1, own.tokens[:, None]).all()


@interpreted
def test_truncated_draws_follow_the_truncated_law():
    """Chi-square: rows with top-p 0.6 (4 of 8 tokens kept) draw from the renormalised kept mass, one
    draw per seed; nothing outside the kept set is ever drawn; the tokens are the reference's."""
    vocab, n = 8, 64
    policy = torch.tensor([1.2, 1.0, 0.8, 0.5, 0.3, 0.2, 0.0, -0.5])
    rows = SamplingRows.build(n, top_p=0.6, seed=torch.arange(n) * 104729 + 3)
    out = kernel(policy.expand(n, vocab), [], None, rows, 1)
    counts = torch.bincount(out.tokens, minlength=vocab)
    assert counts[4:].sum() == 0, counts.tolist()
    assert chi_square_pvalue(counts[:4], torch.softmax(policy[:4], -1)) > 1e-3, counts.tolist()
    assert torch.equal(out.tokens, mix_and_sample_reference(policy.expand(n, vocab), [], None, rows, 1).tokens)


# --------------------------------------------------------------------------------------------------------
# Host-side tests (no kernel launch)
# --------------------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("change,message", [
    (dict(policy=torch.zeros(5)), "batch, vocab"),
    (dict(policy=torch.zeros(2, 10, dtype=torch.int64)), "float32, bfloat16 or float16"),
    (dict(guides=[torch.zeros(2, 9)]), r"guide 0 scores has shape \(2, 9\)"),
    (dict(weights=None), r"weights must have shape \(2, 1\)"),
    (dict(weights=torch.ones(2, 2)), r"weights must have shape \(2, 1\)"),
    (dict(guides=[torch.zeros(2, 10)] * 9, weights=torch.ones(2, 9)), "at most 8 guides"),
    (dict(noise=torch.zeros(2, 11)), r"noise has shape \(2, 11\)"),
    (dict(rows=SamplingRows.build(3)), r"rows.temperature has shape \(3,\)"),
    (dict(step=torch.zeros(3, dtype=torch.int64)), "step must be"),
    (dict(block=100), "power of two"),
    (dict(splits=0), "splits must be >= 1"),
])
def test_argument_errors(change, message):
    args = dict(policy=torch.zeros(2, 10), guides=[torch.zeros(2, 10)], weights=torch.ones(2, 1),
                rows=SamplingRows.build(2), step=0, noise=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        kernel(**args)


@needs_triton
@compiled_only
def test_cpu_tensors_need_cuda_or_the_interpreter():
    policy = torch.randn(2, 50)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        kernel(policy)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        sample_next(policy, implementation="triton")
    rows = SamplingRows.build(2, seed=[3, 4])
    auto = sample_next(policy, rows=rows, step=2)  # CPU tensors go to the reference
    assert torch.equal(auto.tokens, mix_and_sample_reference(policy, [], None, rows, 2).tokens)


@needs_triton
def test_settings_are_packed_once_per_rows_object():
    """The kernel's packed settings are cached on the SamplingRows object: a second step with the same
    rows reuses them (and their workspaces); a modified or replaced field, or `select`, packs anew."""
    from align_decode.kernels.triton_mix import pack_rows

    rows = SamplingRows.build(4, temperature=[0.5, 1.0, 1.5, 2.0], top_k=[0, 3, 0, 0], seed=[1, 2, 3, 4])
    first = pack_rows(rows, 4, 100, torch.device("cpu"))
    assert pack_rows(rows, 4, 100, torch.device("cpu")) is first
    assert first.any_k and not first.any_p and first.any_filter
    torch.testing.assert_close(first.fparams[0], rows.temperature)
    assert first.iparams[2].tolist() == [1, 2, 3, 4]
    rows.top_p[1] = 0.5  # in place
    second = pack_rows(rows, 4, 100, torch.device("cpu"))
    assert second is not first and second.any_p
    rows.seed = torch.tensor([9, 9, 9, 9])  # replaced
    assert pack_rows(rows, 4, 100, torch.device("cpu")).iparams[2].tolist() == [9] * 4
    picked = rows.select(torch.tensor([0, 2]))
    assert not pack_rows(picked, 2, 100, torch.device("cpu")).any_filter
    assert not pack_rows(rows, 4, 3, torch.device("cpu")).any_k  # top_k >= vocab keeps everything


@pytest.fixture
def fresh_choice():
    """The CUDA sampler is chosen once per process: let a test choose again, and leave no choice behind."""
    from align_decode.kernels import dispatch

    dispatch.fused_sampler.cache_clear()
    yield dispatch
    dispatch.fused_sampler.cache_clear()


def test_dispatch_without_triton(monkeypatch, fresh_choice, caplog):
    """Without the kernel, "auto" falls back to the reference with a warning that says why, and "triton"
    says what to install."""
    monkeypatch.setitem(sys.modules, "align_decode.kernels.triton_mix", None)  # import now fails
    caplog.set_level("INFO", logger="align_decode.kernels.dispatch")
    with pytest.warns(AlignDecodeWarning, match="torch reference: .*does not load") as caught:
        assert fresh_choice.fused_sampler() is None
        assert fresh_choice.fused_sampler() is None  # chosen once: no second warning
    assert len(caught) == 1
    assert "torch reference" in caplog.text
    with pytest.raises(RuntimeError, match=r"pip install 'align-decode\[triton\]'"):
        sample_next(torch.randn(2, 50), implementation="triton")
    with pytest.raises(ValueError, match="implementation must be"):
        sample_next(torch.randn(2, 50), implementation="cuda")


@needs_triton
def test_a_triton_without_what_the_kernel_reads_falls_back_with_the_reason(monkeypatch, fresh_choice):
    """A triton release that imports but lacks an attribute the kernel uses is refused up front (it would
    fail on every CUDA step), naming the attribute."""
    wanted = (*fresh_choice.REQUIRED_TRITON_ATTRIBUTES, "language.extra.libdevice.no_such_function")
    monkeypatch.setattr(fresh_choice, "REQUIRED_TRITON_ATTRIBUTES", wanted)
    with pytest.warns(AlignDecodeWarning, match=r"lacks triton\.language\.extra\.libdevice\.no_such_function"):
        assert fresh_choice.fused_sampler() is None


@needs_triton
def test_the_installed_triton_has_what_the_kernel_reads(fresh_choice, caplog):
    """The kernel is chosen, and the log says so with the version."""
    import logging

    with caplog.at_level(logging.INFO, logger="align_decode.kernels.dispatch"):
        assert fresh_choice.fused_sampler() is not None
    assert "Triton kernel (triton " in caplog.text


def test_a_kernel_that_fails_at_its_launch_falls_back_for_the_rest_of_the_process(fresh_choice, monkeypatch):
    """A Triton error at a launch (a compiler or GPU the kernel was not checked on) warns once and hands
    this and every later step to the reference; an error that is not Triton's propagates."""
    CompilationError = type("CompilationError", (Exception,), {"__module__": "triton.compiler.errors"})
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise CompilationError("unsupported fp64 cumsum")

    monkeypatch.setattr(fresh_choice, "fused_sampler", lambda: broken)
    monkeypatch.setattr(fresh_choice, "_on_gpu", lambda scores: True)
    monkeypatch.setattr(fresh_choice, "_FAILED", None)
    rows = SamplingRows.build(3, seed=torch.tensor([1, 2, 3]))
    scores = torch.randn(3, 40)
    expected = mix_and_sample_reference(scores, [], None, rows, 0).tokens
    with pytest.warns(AlignDecodeWarning, match="failed at its launch.*unsupported fp64 cumsum"):
        assert torch.equal(sample_next(scores, rows=rows).tokens, expected)
    assert torch.equal(sample_next(scores, rows=rows).tokens, expected)
    assert calls == [1]  # not tried again

    def wrong(*args, **kwargs):
        raise ValueError("a caller's mistake")

    monkeypatch.setattr(fresh_choice, "_FAILED", None)
    monkeypatch.setattr(fresh_choice, "fused_sampler", lambda: wrong)
    with pytest.raises(ValueError, match="a caller's mistake"):
        sample_next(scores, rows=rows)


def test_disabling_triton_is_logged_not_warned(monkeypatch, fresh_choice, recwarn):
    monkeypatch.setenv("ALIGN_DECODE_DISABLE_TRITON", "1")
    assert fresh_choice.fused_sampler() is None
    assert not [w for w in recwarn if issubclass(w.category, AlignDecodeWarning)]


def test_align_decode_imports_without_triton():
    """align_decode must not import triton at import time: a process where triton cannot be imported
    still imports the package and samples on CPU."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch, align_decode
        from align_decode.kernels import sample_next
        out = sample_next(torch.randn(2, 30))
        assert out.tokens.shape == (2,)
        assert "align_decode.kernels.triton_mix" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------
# GPU tests: the compiled kernel
# --------------------------------------------------------------------------------------------------------

GPU_CASES = {
    "B1-V128256-bf16-two-guides": (1, 128256, 2, torch.bfloat16),
    "B8-V32000-fp32-one-guide": (8, 32000, 1, torch.float32),
    "B64-V151936-bf16-one-guide": (64, 151936, 1, torch.bfloat16),
    "B5-V1000-fp32-policy-only": (5, 1000, 0, torch.float32),
}


@gpu
@needs_cuda
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "filtered"])
def test_gpu_supplied_noise_matches_reference(case, filtered):
    """On CUDA the compiled kernel draws the reference's token (same noise) and keeps its set."""
    batch, vocab, n_guides, dtype = GPU_CASES[case]
    policy, guides, weights = scores(batch, vocab, n_guides, dtype, seed=21, device="cuda")
    policy[:, ::11] = NEG_INF
    settings = dict(temperature=torch.linspace(0.5, 1.5, batch).tolist(), seed=list(range(batch)))
    if filtered:  # rows cycle through: top-p, top-k, top-k = 1, top-k + top-p + min-p
        def cycle(values):
            return [values[i % len(values)] for i in range(batch)]
        settings.update(top_k=cycle([0, 50, 1, 200]), top_p=cycle([0.9, 1.0, 1.0, 0.5]),
                        min_p=cycle([0.0, 0.0, 0.0, 0.02]))
    rows = SamplingRows.build(batch, device="cuda", **settings)
    noise = gumbel(batch, vocab, seed=22, device="cuda")
    out = kernel(policy, guides, weights, rows, 0, noise=noise, return_logprobs=True)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 0, noise=noise, return_logprobs=True)
    full = None
    if filtered:  # the law before truncation, to tell ties at the cut from wrong cuts
        plain = SamplingRows.build(batch, temperature=settings["temperature"], device="cuda")
        full = mix_and_sample_reference(policy, guides, weights, plain, 0, noise=noise, return_logprobs=True).logprobs
    assert_same_draw(out, ref, atol=1e-4, untruncated=full)


@gpu
@needs_cuda
def test_gpu_in_kernel_noise_follows_the_mixed_law():
    vocab, n = 8, 20000
    policy = torch.linspace(1.5, -1.0, vocab, device="cuda")
    guide = torch.linspace(-2.0, 0.0, vocab, device="cuda")
    rows = SamplingRows.build(n, temperature=0.9, seed=torch.arange(n), device="cuda")
    out = kernel(policy.expand(n, vocab), [guide.expand(n, vocab)], torch.full((n, 1), 0.7, device="cuda"), rows, 5)
    counts = torch.bincount(out.tokens, minlength=vocab).cpu()
    mixed = torch.softmax(policy / 0.9 + 0.7 * guide, -1).cpu()
    assert chi_square_pvalue(counts, mixed) > 1e-4, counts.tolist()
    assert chi_square_pvalue(counts, torch.softmax(policy / 0.9, -1).cpu()) < 1e-6


@gpu
@needs_cuda
@pytest.mark.parametrize("filtered", [False, True], ids=["plain", "filtered"])
def test_gpu_draws_are_the_reference_tokens(filtered):
    """The compiled kernel's own draws are the reference's inverse-CDF tokens (fp32 tile sums against the
    reference's fp64 CDF may split a boundary: at most one row of 64 may differ)."""
    batch, vocab = 64, 128256
    policy, guides, weights = scores(batch, vocab, 1, torch.bfloat16, seed=25, device="cuda")
    settings = dict(seed=list(range(batch)))
    if filtered:
        settings.update(top_k=[[0, 50, 1, 200][i % 4] for i in range(batch)],
                        top_p=[[0.9, 1.0, 1.0, 0.5][i % 4] for i in range(batch)])
    rows = SamplingRows.build(batch, device="cuda", **settings)
    out = kernel(policy, guides, weights, rows, 7)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 7)
    assert int((out.tokens != ref.tokens).sum()) <= 1, (out.tokens != ref.tokens).nonzero().flatten().tolist()


@gpu
@needs_cuda
def test_gpu_draw_depends_only_on_seed_and_step():
    batch, vocab = 6, 128256
    policy, guides, weights = scores(batch, vocab, 1, torch.bfloat16, seed=23, device="cuda")
    rows = SamplingRows.build(batch, seed=[5, 6, 7, 8, 9, 10], top_k=[0, 0, 0, 0, 100, 0], device="cuda")
    base = kernel(policy, guides, weights, rows, 3)
    order = torch.tensor([5, 3, 1, 0, 4, 2], device="cuda")
    for splits in (1, 7, None):
        again = kernel(policy[order], [guides[0][order]], weights[order], rows.select(order), 3, splits=splits)
        assert torch.equal(again.tokens, base.tokens[order])
    assert not torch.equal(kernel(policy, guides, weights, rows, 4).tokens, base.tokens)


@gpu
@needs_cuda
def test_gpu_sample_next_uses_the_kernel(monkeypatch):
    from align_decode.kernels import triton_mix

    calls = []
    real = triton_mix.mix_and_sample_triton
    monkeypatch.setattr(triton_mix, "mix_and_sample_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = sample_next(torch.randn(2, 1000, device="cuda"), rows=SamplingRows.build(2, device="cuda"))
    assert calls and out.tokens.is_cuda


@gpu
@needs_cuda
def test_gpu_fully_masked_row_and_zero_weight():
    batch, vocab = 3, 50000
    policy, guides, weights = scores(batch, vocab, 1, seed=24, device="cuda")
    policy[0] = NEG_INF
    top = policy[2].argmax()
    guides[0][2, top] = NEG_INF
    weights[2, 0] = 0.0
    rows = SamplingRows.build(batch, greedy=[False, False, True], device="cuda")
    out = kernel(policy, guides, weights, rows, 0, return_logprobs=True)
    assert out.tokens[0] == 0 and out.logprob[0] == NEG_INF and not out.logprobs.isnan().any()
    assert out.tokens[2] == top and out.logprob[2].isfinite()


@gpu
@needs_cuda
def test_gpu_genarm_loop_draws_through_the_kernel(monkeypatch):
    """The decoding loop on CUDA models samples through the compiled kernel, and every recorded step is
    the GenARM mix recomputed from scratch: log_softmax(log p_policy / T + w log p_arm)."""
    from align_decode import ARM, AlignedModel, GenARM
    from align_decode.kernels import triton_mix
    from tiny import EOS, tiny_llama

    calls = []
    real = triton_mix.mix_and_sample_triton
    monkeypatch.setattr(triton_mix, "mix_and_sample_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    vocab, temperature, weight = 301, 0.8, 2.0
    policy, arm = tiny_llama(vocab, seed=1).cuda(), tiny_llama(vocab, seed=2).cuda()
    ids = torch.tensor([[6, 10, 11, 12, 13], [7, 30, 31, 32, 33], [8, 40, 41, 42, 43]], device="cuda")
    out = AlignedModel(policy, strategy=GenARM(ARM(arm), weights=[weight])).generate(
        input_ids=ids, max_new_tokens=6, do_sample=True, top_k=0, temperature=temperature, seed=[1, 2, 3],
        return_dict_in_generate=True, output_scores=True)
    assert calls and out.sequences.is_cuda
    with torch.no_grad():
        for row in range(ids.shape[0]):
            for t, step_scores in enumerate(out.scores):
                prefix = out.sequences[row, : ids.shape[1] + t].unsqueeze(0)
                if t > 0 and prefix[0, -1] == EOS:
                    break
                z = torch.log_softmax(policy(input_ids=prefix).logits[0, -1].float(), -1) / temperature
                z = z + weight * torch.log_softmax(arm(input_ids=prefix).logits[0, -1].float(), -1)
                torch.testing.assert_close(step_scores[row], torch.log_softmax(z, -1), atol=1e-4, rtol=0)
