"""Triton kernel for the fused step: mix policy and guide scores, truncate, draw one token per row.

It implements the law of `kernels.reference` (read that first):

    z[v]    = s[v] / T_b + sum_i w[b, i] * g_i[v]        (-inf in a weighted guide masks; weight 0 ignores it)
    logp[v] = z[v] - logsumexp(z), then top-k, top-p, min-p on logp, each renormalising
    token   = argmax(logp)                                (greedy rows)
            = argmax(logp + G),  G[v] ~ Gumbel(0, 1)      (sampled rows)

How the pieces are computed without materialising [B, V] intermediates:

* One streaming pass (`_partials_kernel`). A per-row constant cancels in argmax(logp + G), so the draw is
  argmax(z + G): Gumbel-max needs no normaliser, and a running argmax merges across chunks in any order.
  In the same pass an online (max, sum-exp) gives logsumexp(z). When the batch is small the vocabulary of
  a row is split over several programs, each writing partial (max, sum-exp, best score, best token, its z).
* A per-row finishing step (`_finish_kernel`) merges the partials. Rows that set a filter also find the
  truncation cut there: every filter keeps an upper set of z (the k largest with ties, the smallest head of
  mass >= p, everything >= p_max * min_p), so the kept set is {v : z[v] >= cut}. The cut is found by
  pivot search on the order-preserving integer key of z (on a GPU 16 pivots per pass over the row, so at
  most 8 passes pin one of 2^32 keys, for top-k and again for top-p; min-p needs none): no sort. A last
  pass over the row then takes the kept mass and the Gumbel argmax over the kept tokens. This step runs
  one program per row: truncated rows re-read their scores once per pass and do not use the split.
* `_logprobs_kernel` writes the full truncated logp only when it is asked for.

So an untruncated step is two launches and reads the inputs once; `return_logprobs` adds one launch and
one more read.

Noise. With `noise` given ([B, V] Gumbel values, the test path) the kernel draws argmax(logp + noise) like
the reference. Otherwise it makes its own: Philox-4x32-10 keyed by the row's 64-bit seed, with counter
(token id // 4, step low word, step high word, 0), of whose four output words token id % 4 picks one;
then u = max(uniform, tiny) and G = -log(-log1p(-u)). A row's draw is a function of (seed, step, token
ids, scores) only: not of its batch slot, of the other rows, of BLOCK or of the vocabulary split; and a
step kept in a device tensor makes CUDA-graph replays draw fresh noise.

The CPU reference does not use Gumbel noise: it draws by inverse CDF from one `row_uniform(seed, step)`
per row (one random number per row instead of B x V is what makes it cheap on CPU). So for the same seed
and step the CPU and GPU paths draw from the same law but generally pick different tokens. That is
accepted: runs are repeatable on one implementation, not across the two.

Where the kernel can differ from the reference (cases at the level of rounding or exact ties, which
random scores do not hit):
* The draw compares z + G, the reference (z - lse) + G: two candidates within rounding of each other can
  order differently. Likewise greedy compares z where the reference compares z - lse.
* Top-p keeps every token tied with the last kept one (the mass strictly ahead of a token counts tokens
  with a strictly larger score); the reference sorts, so among exact ties at the cut it keeps those its
  sort puts first. Top-k keeps ties in both.
* Cuts are taken on z, the reference takes them on renormalised logp: a token within rounding of a cut
  can fall on the other side.

Running on CPU tensors is possible only under the Triton interpreter (TRITON_INTERPRET=1 set before
triton is first imported): that is how CI tests this file; it is slow and proves nothing about the
compiled GPU code. `kernels.sample_next` is the entry point; it sends CPU tensors to the reference.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .reference import SampleOutput
from .rows import SamplingRows

# Interpreter mode is fixed when `triton.jit` runs, i.e. when this module is imported.
INTERPRETED = bool(triton.knobs.runtime.interpret)

MAX_GUIDES = 8
MAX_SPLITS = 128
SEARCH_BLOCK_GPU = 512  # tokens per step of the top-k / top-p search on a GPU (H100: 512 beat 256 and 1024 at B = 256)

# Order-preserving int32 key of an fp32 value (see `_order_key`), precomputed for -inf: every value has a
# key >= this one, so a cut at it keeps the whole row.
_KEY_NEG_INF = tl.constexpr(-2139095041)
# Larger than the key of any value: a cut at it keeps nothing (fully masked rows).
_KEY_ABOVE_ALL = tl.constexpr(2147483647)
_NO_TOKEN = tl.constexpr(2147483647)  # larger than any token id: "no candidate yet"
_TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal fp32
_LN2 = tl.constexpr(0.6931471805599453)
# Compiled code may use the GPU's approximate special functions; the interpreter has only numpy's.
_COMPILED = tl.constexpr(not INTERPRETED)


# ----------------------------------------------------------------------------------------------------------
# Small pieces shared by the kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                  guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES: tl.constexpr):
    """z = policy / T + sum_i w_i * guide_i for one block of a row, in fp32.

    Columns past the row load as -inf in the policy and 0 in the guides, so they are masked tokens and
    never produce 0 * inf. Products then sums in the reference's order, launched without FMA
    contraction, so z is the reference's z to within one rounding of s / T (bitwise at T = 1).
    """
    z = tl.load(policy_ptr + row * policy_stride + cols, mask=in_range, other=float("-inf")).to(tl.float32)
    # One exact reciprocal per block instead of a division per token (within 1 ulp of the reference's
    # s / T; exact at T = 1).
    z = z * tl.math.div_rn(1.0, temperature)
    for i in tl.static_range(NUM_GUIDES):
        w = tl.load(weight_ptr + row * weight_stride + i).to(tl.float32)
        g = tl.load(guides[i] + row * guide_strides[i] + cols, mask=in_range, other=0.0).to(tl.float32)
        # -inf in a guide masks the token for any nonzero weight (a negative weight must not make it
        # +inf); a zero weight switches the guide off (0 * -inf would be NaN). Same selects as the reference.
        term = tl.where(g == float("-inf"), float("-inf"), w * g)
        z = z + tl.where(w == 0.0, 0.0, term)
    return z


@triton.jit
def _order_key(x):
    """An int32 key with key(a) < key(b) iff a < b for non-NaN fp32 values.

    Non-negative floats already order like their bit patterns; negative ones order in reverse, so their 31
    magnitude bits are flipped. -0.0 is mapped to +0.0 first so that equal values have equal keys.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _log2(x):
    """log2 on the special-function unit (lg2.approx: about 2^-22 relative error, absolute near 1) when
    compiled; numpy's exact log2 under the interpreter. With `tl.log` the noise's logs and series took
    ~105 of 260 us of the kernel on an H100 (B = 256, V = 151936, bf16); see benchmarks/RESULTS.md."""
    if _COMPILED:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _exponential(u):
    """E = -log1p(-u): an Exp(1) variate from u ~ U(0, 1), accurate for the small u that matter.

    Small u give small E, i.e. the largest Gumbel values -log(E), the ones that win the argmax. log(1 - u)
    loses u's digits there (1 - u rounds to 1 below u = 2^-25: E = 0 and an infinite Gumbel), and Triton
    has no portable log1p. For u <= 1/4 use log1p(-u) = 2 atanh(s), s = -u / (2 - u), |s| <= 1/7:
        -log1p(-u) = t (1 + q/3 + q^2/5 + q^3/7 + q^4/9),   t = 2|s| = u / (1 - u/2),  q = s^2 <= 1/49,
    whose truncation error (q^5 / 11 < 4e-10, relative) is below fp32 rounding. For u > 1/4, 1 - u
    rounds by at most 2^-25, a relative error below 2^-23 of E, and the approximate log2 adds < 6e-7.
    """
    t = u / (1.0 - 0.5 * u)  # plain `/` is the approximate division (2 ulp): the series absorbs it
    q = 0.25 * t * t
    series = tl.fma(q, tl.fma(q, tl.fma(q, tl.fma(q, 1.0 / 9, 1.0 / 7), 1.0 / 5), 1.0 / 3), 1.0)
    return tl.where(u > 0.25, -_LN2 * _log2(1.0 - u), t * series)


@triton.jit
def _random_bits(seed, step, start, BLOCK: tl.constexpr):
    """32 random bits for each token start .. start + BLOCK - 1 of a row: a pure function of (seed, step,
    token id), whatever the block, split or batch slot.

    Philox-4x32-10 keyed by the 64-bit seed maps a 128-bit counter to four 32-bit words. The counter
    (token // 4, step low word, step high word, 0) and word token % 4 give each token its own bits, and
    one Philox evaluation (about 100 integer operations) serves four tokens. `start` is a multiple of 4.
    """
    group = (start // 4 + tl.arange(0, BLOCK // 4)).to(tl.uint32)
    zero = group * 0
    step_lo = zero + (step & 0xFFFFFFFF).to(tl.uint32)
    step_hi = zero + ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, group, step_lo, step_hi, zero)
    # join stacks on a new last axis: [g, i, j] holds word 2i + j, so the row-major flattening puts word t
    # of group g at position 4g + t, i.e. at token start + 4g + t.
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK])


@triton.jit
def _gumbel_noise(seed, step, start, BLOCK: tl.constexpr):
    """Gumbel(0, 1) noise for the tokens start .. start + BLOCK - 1 of a row: G = -log(-log1p(-u))."""
    # uniform in [0, 1 - 2^-24]; 0 is possible, and -log1p(-0) = 0 would give an infinite Gumbel
    u = tl.maximum(tl.random.uint_to_uniform_float(_random_bits(seed, step, start, BLOCK)), _TINY)
    # With the approximate log2, G is within ~3e-6 (absolute, at its largest values ~21) of the exact
    # -log(E): under 2 ulp of the z + G it is added to.
    return -_LN2 * _log2(_exponential(u))


@triton.jit
def _draw_scores(z, start, cols, row, noise_ptr, noise_stride, in_range, seed, step,
                 HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """z + Gumbel noise: supplied noise when given (the reference's test path), else in-kernel noise."""
    if HAS_NOISE:
        g = tl.load(noise_ptr + row * noise_stride + cols, mask=in_range, other=0.0).to(tl.float32)
    else:
        g = _gumbel_noise(seed, step, start, BLOCK)
    return z + g


@triton.jit
def _argmax_lanes(best, best_idx, best_z):
    """Reduce per-lane running maxima to one (score, token, z); ties go to the lowest token id (as
    torch.argmax), and a row with no candidate (every score -inf) returns _NO_TOKEN."""
    top = tl.max(best, axis=0)
    pick = tl.min(tl.where(best == top, best_idx, _NO_TOKEN), axis=0)
    z_pick = tl.max(tl.where(best_idx == pick, best_z, float("-inf")), axis=0)
    return top, pick, z_pick


@triton.jit
def _row_filters(row, top_k_ptr, top_p_ptr, min_p_ptr, V):
    """The row's truncation settings and whether any of them is on (top_k >= V keeps everything)."""
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    use_k = (k > 0) & (k < V)
    use_p = p < 1.0
    use_min_p = min_p > 0.0
    return k, p, min_p, use_k, use_p, use_min_p, use_k | use_p | use_min_p


# ----------------------------------------------------------------------------------------------------------
# Pass 1: one streaming pass over (a split of) each row
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _partials_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                     temperature_ptr, noise_ptr, noise_stride, seed_ptr, step_ptr, greedy_ptr,
                     top_k_ptr, top_p_ptr, min_p_ptr,
                     part_m_ptr, part_s_ptr, part_score_ptr, part_idx_ptr, part_z_ptr,
                     V, chunk, n_splits,
                     NUM_GUIDES: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row)
    step = tl.load(step_ptr + row)
    _, _, _, _, _, _, filtered = _row_filters(row, top_k_ptr, top_p_ptr, min_p_ptr, V)
    # Greedy rows need no noise; filtered rows draw later, over the kept set only.
    draw = (tl.load(greedy_ptr + row) == 0) & (filtered == 0)

    lanes = tl.arange(0, BLOCK)
    # Lane-wise running state: one cross-lane reduction at the end instead of one per block.
    m = tl.full([BLOCK], float("-inf"), tl.float32)  # running max of z
    s = tl.zeros([BLOCK], tl.float32)                # running sum of exp(z - m)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], _NO_TOKEN, tl.int32)
    best_z = tl.full([BLOCK], float("-inf"), tl.float32)

    begin = split * chunk
    end = tl.minimum(begin + chunk, V)
    # Software-pipelined loads (3 stages): the next blocks' scores are in flight while this one is
    # mixed; measured on an H100 at B = 256, V = 151936: 146 -> 140 us with noise, 92 -> 82 us greedy.
    for start in tl.range(begin, end, BLOCK, num_stages=3):
        cols = start + lanes
        in_range = cols < end
        z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                          guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
        # Online log-sum-exp with one exp per token: of exp(m - m_new) and exp(z - m_new) one is exp(0),
        # and the other is e = exp(-|z - m|). A new max rescales the sum (s e + 1), otherwise e is added.
        # A masked token (z = -inf) adds exactly 0, also while m is still -inf (where z - m is NaN).
        e = tl.exp(-tl.abs(z - m))
        s = tl.where(z > m, tl.fma(s, e, 1.0), s + tl.where(z == float("-inf"), 0.0, e))
        m = tl.maximum(m, z)

        score = z
        if draw:
            score = _draw_scores(z, start, cols, row, noise_ptr, noise_stride, in_range, seed, step,
                                 HAS_NOISE, BLOCK)
        # Strict > keeps the earliest token of a lane on ties; blocks are visited in token order.
        take = score > best
        best = tl.where(take, score, best)
        best_idx = tl.where(take, cols, best_idx)
        best_z = tl.where(take, z, best_z)

    row_m = tl.max(m, axis=0)
    row_shift = tl.where(row_m == float("-inf"), 0.0, row_m)
    row_s = tl.sum(s * tl.exp(m - row_shift), axis=0)
    top, pick, z_pick = _argmax_lanes(best, best_idx, best_z)

    out = row * n_splits + split
    tl.store(part_m_ptr + out, row_m)
    tl.store(part_s_ptr + out, row_s)
    tl.store(part_score_ptr + out, top)
    tl.store(part_idx_ptr + out, pick)
    tl.store(part_z_ptr + out, z_pick)


# ----------------------------------------------------------------------------------------------------------
# Pass 2: merge the splits; truncated rows find their cut and draw over the kept set
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _kth_largest_key(row, k, lo, hi, policy_ptr, policy_stride, temperature, guides, guide_strides,
                     weight_ptr, weight_stride, V,
                     NUM_GUIDES: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """The key of the k-th largest z of the row (counting ties): the largest K with #{key >= K} >= k.

    Invariant: #{key >= lo} >= k and #{key > hi} < k, so the answer lies in [lo, hi]. Each pass counts the
    tokens at or above NUM_PIVOTS evenly spaced pivots in (lo, hi] and keeps the sub-interval where the
    count crosses k; the interval shrinks (NUM_PIVOTS + 1)-fold per pass.
    """
    j = tl.arange(0, NUM_PIVOTS).to(tl.int64)
    lanes = tl.arange(0, SEARCH_BLOCK)
    while lo < hi:
        width = hi - lo + 1
        stride = (width + NUM_PIVOTS) // (NUM_PIVOTS + 1)  # ceil(width / (NUM_PIVOTS + 1)) >= 1
        pivots = lo + stride * (j + 1)
        # Counts accumulate lane-wise and are reduced once per pass: a cross-thread reduction per block
        # made the search latency-bound (3.9 ms for one row of 128256 tokens on an H100).
        counts = tl.zeros([SEARCH_BLOCK, NUM_PIVOTS], tl.int32)
        for start in range(0, V, SEARCH_BLOCK):
            cols = start + lanes
            in_range = cols < V
            z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                              guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
            key = _order_key(z).to(tl.int64)
            counts += (key[:, None] >= pivots[None, :]).to(tl.int32)
        enough = tl.sum(counts, axis=0) >= k
        # Pivots above hi are never "enough" (invariant), so they leave hi as it is.
        lo = tl.maximum(lo, tl.max(tl.where(enough, pivots, lo), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(enough, hi, pivots - 1), axis=0))
    return lo


@triton.jit
def _top_p_key(row, p, m, lo, hi, policy_ptr, policy_stride, temperature, guides, guide_strides,
               weight_ptr, weight_stride, V,
               NUM_GUIDES: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    """The top-p cut among tokens with key >= lo (the top-k set, or the whole row).

    With e[v] = exp(z[v] - m) and D = sum of e over key >= lo, a token is kept when the mass strictly
    ahead of it is < p, i.e. when G(key[v]) < p * D where G(K) = sum of e over lo <= key, key > K.
    G does not increase with K, so the kept tokens are exactly those with key >= A, A the smallest K with
    G(K) < p * D. Invariant: G(hi) < p * D (true at hi = key(max): nothing is ahead of the max) and
    G(lo - 1) = D >= p * D, so A is in [lo, hi]. Pivots split [lo, hi) as in `_kth_largest_key`.
    """
    lanes = tl.arange(0, SEARCH_BLOCK)
    mass = tl.zeros([SEARCH_BLOCK], tl.float32)
    for start in range(0, V, SEARCH_BLOCK):
        cols = start + lanes
        in_range = cols < V
        z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                          guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
        mass += tl.where(_order_key(z).to(tl.int64) >= lo, tl.exp(z - m), 0.0)
    target = p * tl.sum(mass, axis=0)

    j = tl.arange(0, NUM_PIVOTS).to(tl.int64)
    while lo < hi:
        width = hi - lo + 1
        stride = (width + NUM_PIVOTS) // (NUM_PIVOTS + 1)
        pivots = lo - 1 + stride * (j + 1)
        ahead = tl.zeros([SEARCH_BLOCK, NUM_PIVOTS], tl.float32)  # lane-wise, as in `_kth_largest_key`
        for start in range(0, V, SEARCH_BLOCK):
            cols = start + lanes
            in_range = cols < V
            z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                              guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
            key = _order_key(z).to(tl.int64)
            e = tl.where(key >= lo, tl.exp(z - m), 0.0)
            ahead += tl.where(key[:, None] > pivots[None, :], e[:, None], 0.0)
        below = tl.sum(ahead, axis=0) < target
        # Pivots at or above hi are always "below" (invariant), so they leave hi as it is.
        hi = tl.minimum(hi, tl.min(tl.where(below, pivots, hi), axis=0))
        lo = tl.maximum(lo, tl.max(tl.where(below, lo, pivots + 1), axis=0))
    return lo


@triton.jit
def _draw_above_cut(row, cut, m, draw, policy_ptr, policy_stride, temperature, guides, guide_strides,
                    weight_ptr, weight_stride, noise_ptr, noise_stride, seed, step, V,
                    NUM_GUIDES: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the row: log of the kept mass (renormaliser) and, when `draw`, the Gumbel argmax
    over kept tokens. The row max m is always kept, so the kept mass is >= 1."""
    lanes = tl.arange(0, BLOCK)
    s = tl.zeros([BLOCK], tl.float32)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], _NO_TOKEN, tl.int32)
    best_z = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + lanes
        in_range = cols < V
        z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                          guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
        kept = _order_key(z) >= cut
        s += tl.where(kept, tl.exp(z - m), 0.0)
        if draw:
            score = _draw_scores(z, start, cols, row, noise_ptr, noise_stride, in_range, seed, step,
                                 HAS_NOISE, BLOCK)
            take = kept & (score > best)
            best = tl.where(take, score, best)
            best_idx = tl.where(take, cols, best_idx)
            best_z = tl.where(take, z, best_z)
    _, pick, z_pick = _argmax_lanes(best, best_idx, best_z)
    return m + tl.log(tl.sum(s, axis=0)), pick, z_pick


@triton.jit
def _finish_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                   temperature_ptr, noise_ptr, noise_stride, seed_ptr, step_ptr, greedy_ptr,
                   top_k_ptr, top_p_ptr, min_p_ptr,
                   part_m_ptr, part_s_ptr, part_score_ptr, part_idx_ptr, part_z_ptr, n_splits,
                   token_ptr, logprob_ptr, lse_ptr, cut_ptr, V,
                   NUM_GUIDES: tl.constexpr, HAS_NOISE: tl.constexpr, SPLITS: tl.constexpr,
                   BLOCK: tl.constexpr, SEARCH_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)

    # Merge the splits: logsumexp of partial logsumexps, and the best of the partial argmaxes.
    j = tl.arange(0, SPLITS)
    valid = j < n_splits
    part = row * n_splits + j
    part_m = tl.load(part_m_ptr + part, mask=valid, other=float("-inf"))
    part_s = tl.load(part_s_ptr + part, mask=valid, other=0.0)
    m = tl.max(part_m, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log(tl.sum(part_s * tl.exp(part_m - shift), axis=0))
    # A fully masked row has lse = -inf (and +inf from a +inf score gives NaN): it draws token 0 with
    # log-prob -inf and all log-probs -inf, as in the reference, never NaN.
    finite = (lse > float("-inf")) & (lse < float("inf"))
    _, pick, z_pick = _argmax_lanes(tl.load(part_score_ptr + part, mask=valid, other=float("-inf")),
                                    tl.load(part_idx_ptr + part, mask=valid, other=_NO_TOKEN),
                                    tl.load(part_z_ptr + part, mask=valid, other=float("-inf")))
    found = finite & (pick < _NO_TOKEN)
    token = tl.where(found, pick, 0).to(tl.int64)
    logprob = tl.where(found, z_pick - lse, float("-inf"))
    cut = tl.full([], _KEY_NEG_INF, tl.int32)
    kept_lse = lse

    k, p, min_p, use_k, use_p, use_min_p, filtered = _row_filters(row, top_k_ptr, top_p_ptr, min_p_ptr, V)
    if filtered & finite:
        temperature = tl.load(temperature_ptr + row).to(tl.float32)
        greedy = tl.load(greedy_ptr + row)
        top_key = _order_key(m).to(tl.int64)
        cut64 = tl.full([], _KEY_NEG_INF, tl.int64)
        if use_k:
            cut64 = _kth_largest_key(row, k, cut64, top_key, policy_ptr, policy_stride, temperature,
                                     guides, guide_strides, weight_ptr, weight_stride, V,
                                     NUM_GUIDES, SEARCH_BLOCK, NUM_PIVOTS)
        if use_p:
            cut64 = _top_p_key(row, p, m, cut64, top_key, policy_ptr, policy_stride, temperature,
                               guides, guide_strides, weight_ptr, weight_stride, V,
                               NUM_GUIDES, SEARCH_BLOCK, NUM_PIVOTS)
        if use_min_p:
            # p >= min_p * p_max  <=>  z >= max(z) + log(min_p): no search needed.
            cut64 = tl.maximum(cut64, _order_key(m + tl.log(min_p)).to(tl.int64))
        cut = cut64.to(tl.int32)
        seed = tl.load(seed_ptr + row)
        step = tl.load(step_ptr + row)
        kept_lse, kept_pick, kept_z = _draw_above_cut(
            row, cut, m, greedy == 0, policy_ptr, policy_stride, temperature, guides, guide_strides,
            weight_ptr, weight_stride, noise_ptr, noise_stride, seed, step, V, NUM_GUIDES, HAS_NOISE, BLOCK)
        if greedy != 0:
            # Truncation never drops the max, so the greedy token of pass 1 stands; only its
            # log-prob is renormalised over the kept set.
            logprob = z_pick - kept_lse
        else:
            token = kept_pick.to(tl.int64)
            logprob = kept_z - kept_lse

    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, logprob)
    tl.store(lse_ptr + row, kept_lse)
    tl.store(cut_ptr + row, tl.where(finite, cut, _KEY_ABOVE_ALL))


# ----------------------------------------------------------------------------------------------------------
# Optional pass 3: the full truncated log-probs
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _logprobs_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                     temperature_ptr, lse_ptr, cut_ptr, out_ptr, out_stride, V, chunk,
                     NUM_GUIDES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row).to(tl.float32)
    lse = tl.load(lse_ptr + row)
    cut = tl.load(cut_ptr + row)  # keeps nothing in a fully masked row, so its lse is never used
    lanes = tl.arange(0, BLOCK)
    begin = split * chunk
    end = tl.minimum(begin + chunk, V)
    for start in range(begin, end, BLOCK):
        cols = start + lanes
        in_range = cols < end
        z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                          guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
        kept = _order_key(z) >= cut
        tl.store(out_ptr + row * out_stride + cols, tl.where(kept, z - lse, float("-inf")), mask=in_range)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------

_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_scores(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if t.dtype not in _SCORE_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the policy scores on {device}")
    # Rows may be strided (a slice of a larger buffer); tokens within a row must be adjacent.
    return t if t.stride(-1) == 1 else t.contiguous()


def _row_column(name: str, t: torch.Tensor, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tuple(t.shape) != (batch,):
        raise ValueError(f"rows.{name} has shape {tuple(t.shape)}, expected ({batch},)")
    return t.to(device=device, dtype=dtype).contiguous()


def _step_column(step: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    if step.ndim == 0:
        step = step.expand(batch)
    if tuple(step.shape) != (batch,):
        raise ValueError(f"step must be an int, a scalar tensor or shape ({batch},), got {tuple(step.shape)}")
    return step.contiguous()


def _launch_shape(batch: int, vocab: int, device: torch.device, block: int | None, splits: int | None):
    """(BLOCK, SEARCH_BLOCK, NUM_PIVOTS, number of splits, tokens per split, num_warps).

    On a GPU BLOCK is fixed (no autotuning: the draw does not depend on it, but the log-probs' last bits
    do). The vocabulary is split so that about two programs per SM run when the batch alone cannot
    fill the GPU. Under the interpreter every program costs Python overhead, so blocks are as large as
    the row (up to 4096) and rows are not split unless asked.
    """
    if block is None:
        block = min(2048 if device.type == "cuda" else 4096, max(16, triton.next_power_of_2(vocab)))
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    search_block = SEARCH_BLOCK_GPU if device.type == "cuda" else min(1024, block)
    # Pivots per search pass: passes = ceil(32 / log2(pivots + 1)). On a GPU the [SEARCH_BLOCK, pivots]
    # compare tile must fit in registers; under the interpreter each pass costs Python overhead and the
    # tile is one numpy op, so fewer, wider passes win.
    pivots = 16 if device.type == "cuda" else 256
    n_blocks = triton.cdiv(vocab, block)
    if splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = triton.cdiv(2 * sms, batch)
        else:
            splits = 1
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    splits = min(splits, n_blocks, MAX_SPLITS)
    blocks_per_split = triton.cdiv(n_blocks, splits)
    splits = triton.cdiv(n_blocks, blocks_per_split)
    num_warps = 8 if block >= 2048 else 4
    return block, search_block, pivots, splits, blocks_per_split * block, num_warps


def mix_and_sample_triton(
    policy: torch.Tensor,
    guides: Sequence[torch.Tensor] = (),
    weights: torch.Tensor | None = None,
    rows: SamplingRows | None = None,
    step: torch.Tensor | int = 0,
    noise: torch.Tensor | None = None,
    return_logprobs: bool = False,
    *,
    block: int | None = None,
    splits: int | None = None,
) -> SampleOutput:
    """The Triton twin of `reference.mix_and_sample_reference` (same arguments, same law).

    policy: [B, V] scores; guides: up to MAX_GUIDES tensors [B, V] (fp32, bf16 or fp16 each);
    weights: [B, R]; rows: per-row settings (temperature, top-k/p, min-p, greedy, seed); step: the row's
    decoding step (int or [B] tensor), the second half of the noise key; noise: optional [B, V] Gumbel
    noise replacing the in-kernel noise. `block` and `splits` override the launch shape (tests).
    """
    if policy.ndim != 2:
        raise ValueError(f"policy scores must be [batch, vocab], got shape {tuple(policy.shape)}")
    device = policy.device
    batch, vocab = policy.shape
    if batch == 0 or vocab == 0:
        raise ValueError(f"policy scores must be non-empty, got shape {tuple(policy.shape)}")
    if vocab >= 2**31 - 1:
        raise ValueError(f"vocabulary of {vocab} tokens does not fit the kernel's int32 token ids")
    shape = (batch, vocab)
    policy = _check_scores("policy scores", policy, shape, device)
    guides = tuple(_check_scores(f"guide {i} scores", g, shape, device) for i, g in enumerate(guides))
    if len(guides) > MAX_GUIDES:
        raise ValueError(f"at most {MAX_GUIDES} guides are supported, got {len(guides)}")
    if guides:
        if weights is None or tuple(weights.shape) != (batch, len(guides)):
            got = None if weights is None else tuple(weights.shape)
            raise ValueError(f"weights must have shape ({batch}, {len(guides)}) for {len(guides)} guide(s), got {got}")
        if not weights.is_floating_point():
            raise ValueError(f"weights must be floating point, got {weights.dtype}")
        weights = weights.to(device).contiguous()
    else:
        weights = policy  # never read: NUM_GUIDES = 0
    if noise is not None:
        noise = _check_scores("noise", noise, shape, device)
    if rows is None:
        rows = SamplingRows.build(batch, device=device)

    temperature = _row_column("temperature", rows.temperature, batch, torch.float32, device)
    top_k = _row_column("top_k", rows.top_k, batch, torch.int64, device)
    top_p = _row_column("top_p", rows.top_p, batch, torch.float32, device)
    min_p = _row_column("min_p", rows.min_p, batch, torch.float32, device)
    greedy = _row_column("greedy", rows.greedy, batch, torch.int8, device)
    seed = _row_column("seed", rows.seed, batch, torch.int64, device)
    steps = _step_column(step, batch, device)

    block, search_block, pivots, n_splits, chunk, num_warps = _launch_shape(batch, vocab, device, block, splits)
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "the Triton mix-and-sample kernel needs CUDA tensors (CPU tensors run only under the Triton "
            "interpreter: TRITON_INTERPRET=1 set before triton is imported); use kernels.sample_next, which "
            "sends CPU tensors to the torch reference")
    # Compiled launches must not contract w * g + z into an FMA: z would differ from the reference's.
    options = {} if INTERPRETED else {"enable_fp_fusion": False}

    inputs = (policy, policy.stride(0), guides, tuple(g.stride(0) for g in guides), weights, weights.stride(0),
              temperature)
    noise_args = (noise if noise is not None else policy, noise.stride(0) if noise is not None else 0)
    row_args = (seed, steps, greedy, top_k, top_p, min_p)
    part_m = torch.empty(batch, n_splits, dtype=torch.float32, device=device)
    part_s = torch.empty_like(part_m)
    part_score = torch.empty_like(part_m)
    part_z = torch.empty_like(part_m)
    part_idx = torch.empty(batch, n_splits, dtype=torch.int32, device=device)
    parts = (part_m, part_s, part_score, part_idx, part_z)

    _partials_kernel[(batch, n_splits)](
        *inputs, *noise_args, *row_args, *parts, vocab, chunk, n_splits,
        NUM_GUIDES=len(guides), HAS_NOISE=noise is not None, BLOCK=block, num_warps=num_warps, **options)

    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprob = torch.empty(batch, dtype=torch.float32, device=device)
    lse = torch.empty(batch, dtype=torch.float32, device=device)
    cut = torch.empty(batch, dtype=torch.int32, device=device)
    _finish_kernel[(batch,)](
        *inputs, *noise_args, *row_args, *parts, n_splits, tokens, logprob, lse, cut, vocab,
        NUM_GUIDES=len(guides), HAS_NOISE=noise is not None, SPLITS=triton.next_power_of_2(n_splits),
        BLOCK=min(block, 1024), SEARCH_BLOCK=search_block, NUM_PIVOTS=pivots, num_warps=8, **options)

    logprobs = None
    if return_logprobs:
        logprobs = torch.empty(batch, vocab, dtype=torch.float32, device=device)
        _logprobs_kernel[(batch, n_splits)](
            *inputs, lse, cut, logprobs, logprobs.stride(0), vocab, chunk,
            NUM_GUIDES=len(guides), BLOCK=block, num_warps=num_warps, **options)
    return SampleOutput(tokens=tokens, logprob=logprob, logprobs=logprobs)
