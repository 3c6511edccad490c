"""Triton kernels for the fused step: mix policy and guide scores, truncate, draw one token per row.

They implement the law of `kernels.reference` (read that first) and draw the reference's token:

    z[v]    = s[v] / T_b + sum_i w[b, i] * g_i[v]        (-inf in a weighted guide masks; weight 0 ignores it)
    logp[v] = z[v] - logsumexp(z), then top-k, top-p, min-p on logp, each renormalising
    token   = argmax(logp)                                (greedy rows)
            = inverse CDF of exp(logp) at u,  u = row_uniform(seed, step)    (sampled rows)

Sampling by a two-level inverse CDF
-----------------------------------
The vocabulary is cut into tiles of BLOCK consecutive tokens. Pass 1 (`_tiles_kernel`) reads every score
once and writes, per tile t, its max m_t and mass s_t = sum_{v in t} exp(z_v - m_t): no random numbers,
one exp per token, so the pass runs at the speed of the loads. With M = max_t m_t and
w_t = s_t exp(m_t - M), the row's mass is S = sum_t w_t and logsumexp(z) = M + log S.

The finishing step (`_finish_kernel`, one program per row) takes the row's single uniform u (the same
SplitMix64 function of (seed, step) as `rows.row_uniform`, computed in the kernel) and the target
x = u S, then

  1. picks the tile t* whose interval [C_{t*-1}, C_{t*}) of the tile prefix sums C contains x;
  2. re-reads that one tile (BLOCK tokens, about 1% of a 128k-vocabulary row at BLOCK 1024-2048) and
     picks the token whose interval of the in-tile prefix sums contains f * s'_t*, where
     f = (x - C_{t*-1}) / w_t* is x's position within the tile's interval and s'_t* the re-read mass.

In exact arithmetic this is the flat inverse CDF: the token is the smallest v with
sum_{v' <= v} p[v'] > u, whatever the tiling, so (i) the law is exactly softmax(z) (P(v) = w_t/S *
p_v/w_t), (ii) the token is the reference's (`reference.inverse_cdf_sample` with the same u), and (iii) it
depends only on (seed, step, scores): not on the batch slot, the other rows, the vocabulary split or
the tile size. In floating point the kernel sums in fp32 within a tile and in fp64 over tiles, the
reference in fp64 over the row: the two can pick neighbouring tokens when u falls within rounding
(~1e-7 relative) of a CDF boundary. For a fixed BLOCK the kernel's result is bitwise the same for any
split and batch slot (each tile is reduced by the same code; the finishing step sums tiles in order).
Compared with Gumbel-max (a Philox draw and two logarithms per token, which made pass 1 compute-bound),
the noise costs one 64-bit hash per row, one pass over the tile prefix sums and one re-read tile.

With `noise` given ([B, V] Gumbel values: the test path) the kernels instead draw argmax(logp + noise)
over the kept tokens like the reference's noise path (a running argmax per split, merged at the end).

Truncation split over several programs per row, state on the device
--------------------------------------------------------------------
Every filter keeps an upper set of z (the k largest with ties, the smallest head of mass >= p with ties
at its cut, everything >= p_max * min_p), so the kept set is {v : key(z_v) >= cut}, key the
order-preserving int32 key of z. The cut is found by pivot search on the key: each pass counts (top-k)
or sums exp(z - M) (top-p) at NUM_PIVOTS pivots of the current interval [lo, hi], shrinking it
(NUM_PIVOTS + 1)-fold, so a fixed number of passes (8 with 16 pivots, 4 with 256) pins the cut. Each
pass is one launch of `_search_pass_kernel` over (row, split) that writes per-split partials; the
interval of a row lives in device memory and is narrowed at the start of the next pass by every split
program alike (in the same order, so identically) from the previous pass's partials: no host round
trip, and the number of launches does not depend on the data. Top-p searches above the top-k cut, its
first pass also summing the mass D kept by top-k (target p D). `_kept_tiles_kernel` then applies the
final narrowing and min-p and writes the kept mass of every tile, and the finishing step samples from
those tiles as above. The host only knows which filters occur in the batch (packed once per batch, see
below) to skip the passes of absent filters.

Host cost
---------
The per-row settings are packed into two device tensors once per SamplingRows object and cached on it
(re-packed if a field tensor is replaced or modified in place); workspaces are cached with them. The
decoding loop keeps one SamplingRows object until its batch changes (`select` makes a new one), so a
step pays the pack once per batch change, and a step with a [B] int64 step tensor launches the kernels
without any other host-side tensor operation or synchronisation (so it can be captured in a CUDA graph
once the rows were packed).

Where the kernel can differ from the reference (rounding and exact ties, which random scores do not hit):
* Draws: see above (fp32 tile sums against the reference's fp64 row CDF). Greedy rows compare z where the
  reference compares z - lse.
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

from dataclasses import dataclass, fields
from typing import Sequence

import torch
import triton
import triton.language as tl

from .reference import SampleOutput
from .rows import SamplingRows

# Interpreter mode is fixed when `triton.jit` runs, i.e. when this module is imported.
INTERPRETED = bool(triton.knobs.runtime.interpret)

MAX_GUIDES = 8
MAX_SPLITS = 128
SEARCH_BLOCK_GPU = 512  # tokens per step of the top-k / top-p search on a GPU (H100: 512 beat 256 and 1024 at B = 256)
PIVOTS_GPU = 16  # pivots per search pass on a GPU: 8 passes per filter (the GPU benchmark sweeps 16 / 64 / 256)
BLOCK_GPU = 2048  # tokens per tile on a GPU
TILE_SCAN = 1024  # tiles per step of the finishing step's scans over a row's tiles

# Order-preserving int32 key of an fp32 value (see `_order_key`), precomputed for -inf: every value has a
# key >= this one, so a cut at it keeps the whole row.
_KEY_NEG_INF = tl.constexpr(-2139095041)
KEY_NEG_INF = -2139095041
# Larger than the key of any value: a cut at it keeps nothing (fully masked rows).
_KEY_ABOVE_ALL = tl.constexpr(2147483647)
_NO_TOKEN = tl.constexpr(2147483647)  # larger than any token id: "no candidate yet"
_NO_TILE = tl.constexpr(2147483647)

# Rows of the packed settings (see `PackedRows`).
_F_TEMPERATURE, _F_TOP_P, _F_MIN_P = 0, 1, 2
_I_TOP_K, _I_GREEDY, _I_SEED = 0, 1, 2


def search_passes(pivots: int) -> int:
    """Passes of the pivot search that pin one of 2^32 keys: each leaves ceil(width / (pivots + 1))."""
    width, passes = 2**32, 0
    while width > 1:
        width = -(-width // (pivots + 1))
        passes += 1
    return passes


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
def _splitmix64(x):
    """SplitMix64 finaliser on uint64 (wrapping arithmetic, logical shifts), as `rows.splitmix64`."""
    z = x + 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _row_uniform(seed, step):
    """`rows.row_uniform(seed, step)` in the kernel: one fp64 uniform in [0, 1) with 53 random bits."""
    z = _splitmix64(_splitmix64(seed.to(tl.uint64, bitcast=True)) + step.to(tl.uint64, bitcast=True))
    return (z >> 11).to(tl.float64) * 1.1102230246251565e-16  # 2^-53


@triton.jit
def _argmax_lanes(best, best_idx, best_z):
    """Reduce per-lane running maxima to one (score, token, z); ties go to the lowest token id (as
    torch.argmax), and a row with no candidate (every score -inf) returns _NO_TOKEN."""
    top = tl.max(best, axis=0)
    pick = tl.min(tl.where(best == top, best_idx, _NO_TOKEN), axis=0)
    z_pick = tl.max(tl.where(best_idx == pick, best_z, float("-inf")), axis=0)
    return top, pick, z_pick


@triton.jit
def _take_larger(score, z, cols, best, best_idx, best_z):
    """Per lane, keep the larger noisy score (strict: the earliest token of a lane wins ties, since tiles
    go in token order), with its token and its z."""
    take = score > best
    return tl.where(take, score, best), tl.where(take, cols, best_idx), tl.where(take, z, best_z)


@triton.jit
def _store_partial(best, best_idx, best_z, part_score_ptr, part_idx_ptr, part_z_ptr, out):
    """A split's (score, token, z) from its lanes' running maxima."""
    top, pick, z_pick = _argmax_lanes(best, best_idx, best_z)
    tl.store(part_score_ptr + out, top)
    tl.store(part_idx_ptr + out, pick)
    tl.store(part_z_ptr + out, z_pick)


@triton.jit
def _row_settings(row, fparams, iparams, batch, V):
    """The row's settings from the packed tensors, and which filters it uses (top_k >= V keeps all)."""
    temperature = tl.load(fparams + row)
    p = tl.load(fparams + batch + row)
    min_p = tl.load(fparams + 2 * batch + row)
    k = tl.load(iparams + row)
    greedy = tl.load(iparams + batch + row) != 0
    use_k = (k > 0) & (k < V)
    use_p = p < 1.0
    use_min_p = min_p > 0.0
    return temperature, k, p, min_p, greedy, use_k, use_p, use_min_p


@triton.jit
def _row_max(row, tile_m_ptr, n_tiles, TILES: tl.constexpr):
    """max over the row's tile maxima: the row's largest z (-inf for a fully masked row)."""
    t = tl.arange(0, TILES)
    acc = tl.full([TILES], float("-inf"), tl.float32)
    for t0 in range(0, n_tiles, TILES):
        acc = tl.maximum(acc, tl.load(tile_m_ptr + row * n_tiles + t0 + t, mask=t0 + t < n_tiles,
                                      other=float("-inf")))
    return tl.max(acc, axis=0)


# ----------------------------------------------------------------------------------------------------------
# Pass 1: one streaming pass over (a split of) each row: per-tile max and mass
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tiles_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                  fparams, iparams, batch, noise_ptr, noise_stride,
                  tile_m_ptr, tile_s_ptr, part_score_ptr, part_idx_ptr, part_z_ptr,
                  V, n_tiles, tiles_per_split, n_splits,
                  NUM_GUIDES: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature = tl.load(fparams + row)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], _NO_TOKEN, tl.int32)
    best_z = tl.full([BLOCK], float("-inf"), tl.float32)
    t_begin = split * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    # Software-pipelined loads: the next tiles' scores are in flight while this one is reduced.
    for t in tl.range(t_begin, t_end, 1, num_stages=3):
        cols = t * BLOCK + lanes
        in_range = cols < V
        z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                          guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
        m_t = tl.max(z, axis=0)
        # A fully masked tile has mass 0 (exp(-inf) = 0), not NaN.
        s_t = tl.sum(tl.exp(z - tl.where(m_t == float("-inf"), 0.0, m_t)), axis=0)
        tl.store(tile_m_ptr + row * n_tiles + t, m_t)
        tl.store(tile_s_ptr + row * n_tiles + t, s_t)
        if HAS_NOISE:
            score = z + tl.load(noise_ptr + row * noise_stride + cols, mask=in_range, other=0.0).to(tl.float32)
            best, best_idx, best_z = _take_larger(score, z, cols, best, best_idx, best_z)
    if HAS_NOISE:
        _store_partial(best, best_idx, best_z, part_score_ptr, part_idx_ptr, part_z_ptr, row * n_splits + split)


# ----------------------------------------------------------------------------------------------------------
# Truncation: pivot search split over programs, the interval kept on the device
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _search_init_kernel(fparams, iparams, batch, tile_m_ptr, n_tiles, row_max_ptr, lo_ptr, hi_ptr, V,
                        TILES: tl.constexpr):
    """The row's max z, and the first top-k interval [key(-inf), key(max)] (empty where unused)."""
    row = tl.program_id(0).to(tl.int64)
    _, _, _, _, _, use_k, _, _ = _row_settings(row, fparams, iparams, batch, V)
    m = _row_max(row, tile_m_ptr, n_tiles, TILES)
    tl.store(row_max_ptr + row, m)
    finite = (m > float("-inf")) & (m < float("inf"))
    lo = tl.full([], _KEY_NEG_INF, tl.int64)
    hi = tl.where(use_k & finite, _order_key(m).to(tl.int64), lo)
    tl.store(lo_ptr + row, lo)
    tl.store(hi_ptr + row, hi)


@triton.jit
def _narrowed(row, n, n_k, lo_ptr, hi_ptr, cnt_ptr, mass_ptr, dmass_ptr, batch, n_splits, k, p,
              NUM_PIVOTS: tl.constexpr, SPLITS: tl.constexpr):
    """The interval [lo, hi] of pass n: the one pass n - 1 searched (state n), narrowed by its partials.

    Top-k (pass n - 1 < n_k) keeps the invariant #{key >= lo} >= k > #{key > hi}: pivots
    lo + stride (j + 1) with count >= k raise lo, the others lower hi. Top-p keeps G(hi) < p D <= G(lo - 1),
    G(K) the mass with key > K among tokens above the top-k cut and D that set's mass: pivots
    lo - 1 + stride (j + 1). Partials are summed over splits in split order, the same in every program.
    """
    lo = tl.load(lo_ptr + n * batch + row)
    hi = tl.load(hi_ptr + n * batch + row)
    if n > 0:
        if lo < hi:
            j = tl.arange(0, NUM_PIVOTS).to(tl.int64)
            s = tl.arange(0, SPLITS)
            prev = ((n - 1) * batch + row) * n_splits
            idx = (prev + s)[:, None] * NUM_PIVOTS + j[None, :]
            valid = (s < n_splits)[:, None]
            width = hi - lo + 1
            stride = (width + NUM_PIVOTS) // (NUM_PIVOTS + 1)  # ceil(width / (NUM_PIVOTS + 1)) >= 1
            if n - 1 < n_k:
                counts = tl.sum(tl.load(cnt_ptr + idx, mask=valid, other=0), axis=0)
                pivots = lo + stride * (j + 1)
                enough = counts >= k
                # Pivots above hi are never "enough" (invariant), so they leave hi as it is.
                new_lo = tl.maximum(lo, tl.max(tl.where(enough, pivots, lo), axis=0))
                new_hi = tl.minimum(hi, tl.min(tl.where(enough, hi, pivots - 1), axis=0))
            else:
                ahead = tl.sum(tl.load(mass_ptr + idx, mask=valid, other=0.0), axis=0)
                total = tl.sum(tl.load(dmass_ptr + row * n_splits + s, mask=s < n_splits, other=0.0), axis=0)
                pivots = lo - 1 + stride * (j + 1)
                below = ahead < p * total
                # Pivots at or above hi are always "below" (invariant), so they leave hi as it is.
                new_hi = tl.minimum(hi, tl.min(tl.where(below, pivots, hi), axis=0))
                new_lo = tl.maximum(lo, tl.max(tl.where(below, lo, pivots + 1), axis=0))
            lo = new_lo
            hi = new_hi
    return lo, hi


@triton.jit
def _search_pass_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                        fparams, iparams, batch, row_max_ptr, lo_ptr, hi_ptr, cnt_ptr, mass_ptr, dmass_ptr,
                        n, n_k, V, chunk, n_splits,
                        NUM_GUIDES: tl.constexpr, TOP_P: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
                        NUM_PIVOTS: tl.constexpr, SPLITS: tl.constexpr):
    """Pass n of the search over one split of a row: narrow the interval from pass n - 1, then count the
    tokens (top-k) or sum the mass (top-p) at or above / above each pivot of the new interval."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature, k, p, _, _, _, use_p, _ = _row_settings(row, fparams, iparams, batch, V)
    lo, hi = _narrowed(row, n, n_k, lo_ptr, hi_ptr, cnt_ptr, mass_ptr, dmass_ptr, batch, n_splits, k, p,
                       NUM_PIVOTS, SPLITS)
    m = tl.load(row_max_ptr + row)
    if TOP_P:
        if n == n_k:  # the first top-p pass: search above the top-k cut (lo; the k interval is closed)
            finite = (m > float("-inf")) & (m < float("inf"))
            hi = tl.where(use_p & finite, _order_key(m).to(tl.int64), lo)
    if split == 0:
        tl.store(lo_ptr + (n + 1) * batch + row, lo)
        tl.store(hi_ptr + (n + 1) * batch + row, hi)
    if lo < hi:
        j = tl.arange(0, NUM_PIVOTS).to(tl.int64)
        lanes = tl.arange(0, SEARCH_BLOCK)
        width = hi - lo + 1
        stride = (width + NUM_PIVOTS) // (NUM_PIVOTS + 1)
        begin = split * chunk
        end = tl.minimum(begin + chunk, V)
        out = ((n * batch + row) * n_splits + split) * NUM_PIVOTS + j
        if TOP_P:
            pivots = lo - 1 + stride * (j + 1)
            # Lane-wise sums reduced once per pass (a cross-thread reduction per block is latency-bound).
            ahead = tl.zeros([SEARCH_BLOCK, NUM_PIVOTS], tl.float32)
            kept = tl.zeros([SEARCH_BLOCK], tl.float32)
            for start in range(begin, end, SEARCH_BLOCK):
                cols = start + lanes
                z = _mixed_scores(row, cols, cols < end, policy_ptr, policy_stride, temperature,
                                  guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
                key = _order_key(z).to(tl.int64)
                e = tl.where(key >= lo, tl.exp(z - m), 0.0)
                kept += e
                ahead += tl.where(key[:, None] > pivots[None, :], e[:, None], 0.0)
            tl.store(mass_ptr + out, tl.sum(ahead, axis=0))
            if n == n_k:
                tl.store(dmass_ptr + row * n_splits + split, tl.sum(kept, axis=0))
        else:
            pivots = lo + stride * (j + 1)
            counts = tl.zeros([SEARCH_BLOCK, NUM_PIVOTS], tl.int32)
            for start in range(begin, end, SEARCH_BLOCK):
                cols = start + lanes
                z = _mixed_scores(row, cols, cols < end, policy_ptr, policy_stride, temperature,
                                  guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
                key = _order_key(z).to(tl.int64)
                counts += (key[:, None] >= pivots[None, :]).to(tl.int32)
            tl.store(cnt_ptr + out, tl.sum(counts, axis=0))


@triton.jit
def _kept_tiles_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                       fparams, iparams, batch, noise_ptr, noise_stride, row_max_ptr,
                       lo_ptr, hi_ptr, cnt_ptr, mass_ptr, dmass_ptr, n_passes, n_k, cut_ptr,
                       tile_m_ptr, kept_s_ptr, part_score_ptr, part_idx_ptr, part_z_ptr,
                       V, n_tiles, tiles_per_split, n_splits,
                       NUM_GUIDES: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
                       NUM_PIVOTS: tl.constexpr, SPLITS: tl.constexpr):
    """The final cut of a truncated row (last narrowing, then min-p), and the kept mass of every tile
    (with supplied noise also the split's argmax of z + noise over kept tokens)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature, k, p, min_p, _, use_k, use_p, use_min_p = _row_settings(row, fparams, iparams, batch, V)
    m = tl.load(row_max_ptr + row)
    finite = (m > float("-inf")) & (m < float("inf"))
    if (use_k | use_p | use_min_p) & finite:
        cut, _ = _narrowed(row, n_passes, n_k, lo_ptr, hi_ptr, cnt_ptr, mass_ptr, dmass_ptr, batch,
                           n_splits, k, p, NUM_PIVOTS, SPLITS)
        if use_min_p:
            # p >= min_p * p_max  <=>  z >= max(z) + log(min_p): no search needed.
            cut = tl.maximum(cut, _order_key(m + tl.log(min_p)).to(tl.int64))
        if split == 0:
            tl.store(cut_ptr + row, cut.to(tl.int32))
        lanes = tl.arange(0, BLOCK)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_idx = tl.full([BLOCK], _NO_TOKEN, tl.int32)
        best_z = tl.full([BLOCK], float("-inf"), tl.float32)
        t_begin = split * tiles_per_split
        t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
        for t in range(t_begin, t_end):
            cols = t * BLOCK + lanes
            in_range = cols < V
            z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                              guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
            kept = _order_key(z).to(tl.int64) >= cut
            m_t = tl.load(tile_m_ptr + row * n_tiles + t)
            e = tl.where(kept, tl.exp(z - tl.where(m_t == float("-inf"), 0.0, m_t)), 0.0)
            tl.store(kept_s_ptr + row * n_tiles + t, tl.sum(e, axis=0))
            if HAS_NOISE:
                g = tl.load(noise_ptr + row * noise_stride + cols, mask=in_range, other=0.0).to(tl.float32)
                score = tl.where(kept, z + g, float("-inf"))
                best, best_idx, best_z = _take_larger(score, z, cols, best, best_idx, best_z)
        if HAS_NOISE:
            _store_partial(best, best_idx, best_z, part_score_ptr, part_idx_ptr, part_z_ptr, row * n_splits + split)


# ----------------------------------------------------------------------------------------------------------
# The finishing step: one program per row
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["step_value"])
def _finish_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                   fparams, iparams, batch, step_ptr, step_value,
                   tile_m_ptr, tile_s_ptr, kept_s_ptr, cut_ptr,
                   part_score_ptr, part_idx_ptr, part_z_ptr, n_splits,
                   token_ptr, logprob_ptr, lse_ptr, V, n_tiles,
                   NUM_GUIDES: tl.constexpr, HAS_NOISE: tl.constexpr, ANY_FILTER: tl.constexpr,
                   STEP_PER_ROW: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
                   TILES: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    temperature, _, _, _, greedy, use_k, use_p, use_min_p = _row_settings(row, fparams, iparams, batch, V)
    filtered = use_k | use_p | use_min_p
    if not ANY_FILTER:
        filtered = False
    t = tl.arange(0, TILES)
    base = row * n_tiles

    # The row's max, its mass and the kept mass (tile masses scaled to the row max, summed in fp64).
    m = _row_max(row, tile_m_ptr, n_tiles, TILES)
    shift = tl.where(m == float("-inf"), 0.0, m)
    full = tl.zeros([TILES], tl.float64)
    kept = tl.zeros([TILES], tl.float64)
    for t0 in range(0, n_tiles, TILES):
        valid = t0 + t < n_tiles
        m_t = tl.load(tile_m_ptr + base + t0 + t, mask=valid, other=float("-inf"))
        scale = tl.exp(m_t - shift)
        w = tl.load(tile_s_ptr + base + t0 + t, mask=valid, other=0.0) * scale
        full += w.to(tl.float64)
        if filtered:
            kept += (tl.load(kept_s_ptr + base + t0 + t, mask=valid, other=0.0) * scale).to(tl.float64)
    total = tl.sum(full, axis=0)
    lse = m + tl.log(total.to(tl.float32))
    kept_total = total
    if filtered:
        kept_total = tl.sum(kept, axis=0)
    kept_lse = m + tl.log(kept_total.to(tl.float32))
    # A fully masked row has lse = -inf (and +inf or NaN scores give NaN): it draws token 0 with
    # log-prob -inf and all log-probs -inf, as in the reference, never NaN.
    finite = (lse > float("-inf")) & (lse < float("inf"))
    cut = tl.full([], _KEY_NEG_INF, tl.int32)
    if filtered:
        cut = tl.load(cut_ptr + row)
    token = tl.zeros([], tl.int64)
    logprob = tl.full([], float("-inf"), tl.float32)

    if finite:
        if (greedy == 0) & HAS_NOISE:
            # Supplied noise: merge the splits' argmaxes of z + noise (over kept tokens where filtered).
            j = tl.arange(0, SPLITS)
            ok = j < n_splits
            part = row * n_splits + j
            _, pick, z_pick = _argmax_lanes(tl.load(part_score_ptr + part, mask=ok, other=float("-inf")),
                                            tl.load(part_idx_ptr + part, mask=ok, other=_NO_TOKEN),
                                            tl.load(part_z_ptr + part, mask=ok, other=float("-inf")))
            if pick < _NO_TOKEN:
                token = pick.to(tl.int64)
                logprob = z_pick - kept_lse
        else:
            # The tile to re-read: greedy rows the first tile holding the max; sampled rows the tile whose
            # interval of the tile prefix sums holds x = u * (kept mass).
            if STEP_PER_ROW:
                step = tl.load(step_ptr + row)
            else:
                step = step_value.to(tl.int64)
            x = _row_uniform(tl.load(iparams + 2 * batch + row), step) * kept_total
            carry = tl.zeros([], tl.float64)
            chosen = tl.full([], _NO_TILE, tl.int32)
            before = tl.zeros([], tl.float64)  # prefix sum before the chosen tile
            width = tl.zeros([], tl.float64)   # the chosen tile's mass
            last = tl.full([], -1, tl.int32)   # the last tile with mass (if rounding leaves x past the end)
            for t0 in range(0, n_tiles, TILES):
                valid = t0 + t < n_tiles
                m_t = tl.load(tile_m_ptr + base + t0 + t, mask=valid, other=float("-inf"))
                if greedy:
                    chosen = tl.minimum(chosen, tl.min(tl.where(m_t == m, t0 + t, _NO_TILE), axis=0))
                else:
                    if filtered:
                        s_t = tl.load(kept_s_ptr + base + t0 + t, mask=valid, other=0.0)
                    else:
                        s_t = tl.load(tile_s_ptr + base + t0 + t, mask=valid, other=0.0)
                    w = (s_t * tl.exp(m_t - shift)).to(tl.float64)
                    c = carry + tl.cumsum(w, axis=0)
                    hit = tl.min(tl.where(c > x, t0 + t, _NO_TILE), axis=0)
                    if chosen == _NO_TILE:
                        if hit < _NO_TILE:
                            chosen = hit
                            width = tl.sum(tl.where(t0 + t == hit, w, 0.0), axis=0)
                            before = tl.sum(tl.where(t0 + t == hit, c, 0.0), axis=0) - width
                    last = tl.maximum(last, tl.max(tl.where(w > 0, t0 + t, -1), axis=0))
                    carry = tl.sum(tl.where(valid, w, 0.0), axis=0) + carry
            frac = tl.zeros([], tl.float64)
            if not greedy:
                if chosen == _NO_TILE:
                    chosen = last
                    frac = tl.full([], 1.0, tl.float64)
                else:
                    frac = (x - before) / width
            # Re-read the chosen tile.
            lanes = tl.arange(0, BLOCK)
            cols = chosen.to(tl.int64) * BLOCK + lanes
            in_range = cols < V
            z = _mixed_scores(row, cols, in_range, policy_ptr, policy_stride, temperature,
                              guides, guide_strides, weight_ptr, weight_stride, NUM_GUIDES)
            if greedy:
                pick = tl.min(tl.where(z == m, cols, _NO_TOKEN), axis=0)
            else:
                m_c = tl.load(tile_m_ptr + base + chosen)
                e = tl.exp(z - tl.where(m_c == float("-inf"), 0.0, m_c))
                e = tl.where(in_range & (_order_key(z) >= cut), e, 0.0).to(tl.float64)
                c = tl.cumsum(e, axis=0)
                target = frac * tl.sum(e, axis=0)
                pick = tl.min(tl.where(c > target, cols, _NO_TOKEN), axis=0)
                if pick == _NO_TOKEN:  # rounding put the target at the tile's end: its last kept token
                    pick = tl.max(tl.where(e > 0, cols, -1), axis=0)
            token = pick.to(tl.int64)
            logprob = tl.max(tl.where(cols == pick, z, float("-inf")), axis=0) - kept_lse

    tl.store(token_ptr + row, token)
    tl.store(logprob_ptr + row, logprob)
    tl.store(lse_ptr + row, kept_lse)
    tl.store(cut_ptr + row, tl.where(finite, cut, _KEY_ABOVE_ALL))


# ----------------------------------------------------------------------------------------------------------
# Optional: the full truncated log-probs
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _logprobs_kernel(policy_ptr, policy_stride, guides, guide_strides, weight_ptr, weight_stride,
                     fparams, lse_ptr, cut_ptr, out_ptr, out_stride, V, chunk,
                     NUM_GUIDES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    temperature = tl.load(fparams + row)
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
_ROW_FIELDS = tuple(f.name for f in fields(SamplingRows))


def _check_scores(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if t.dtype not in _SCORE_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the policy scores on {device}")
    # Rows may be strided (a slice of a larger buffer); tokens within a row must be adjacent.
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass
class PackedRows:
    """A batch's settings as the kernels read them, built once per SamplingRows object (per batch).

    fparams [3, B] float32: temperature, top_p, min_p; iparams [3, B] int64: top_k, greedy, seed. The
    any_* flags (one host synchronisation when packing) say which filter passes a step must launch.
    workspaces: scratch buffers by launch shape, reused by the steps of the same batch.
    """

    key: tuple
    fparams: torch.Tensor
    iparams: torch.Tensor
    any_k: bool
    any_p: bool
    any_filter: bool
    workspaces: dict


def _rows_key(rows: SamplingRows, device: torch.device) -> tuple:
    # Identity and in-place version of every field: replacing or modifying a field re-packs.
    return (device,) + tuple((id(t), t._version) for t in (getattr(rows, n) for n in _ROW_FIELDS))


def pack_rows(rows: SamplingRows, batch: int, vocab: int, device: torch.device) -> PackedRows:
    """The packed settings of `rows`, cached on the object: a step with the same rows pays only a key check."""
    key = _rows_key(rows, device) + (vocab,)
    packed = rows.__dict__.get("_kernel_pack")
    if packed is not None and packed.key == key:
        return packed
    for name in _ROW_FIELDS:
        t = getattr(rows, name)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"rows.{name} has shape {tuple(t.shape)}, expected ({batch},)")
    fparams = torch.stack([rows.temperature.to(device, torch.float32), rows.top_p.to(device, torch.float32),
                           rows.min_p.to(device, torch.float32)]).contiguous()
    iparams = torch.stack([rows.top_k.to(device, torch.int64), rows.greedy.to(device, torch.int64),
                           rows.seed.to(device, torch.int64)]).contiguous()
    top_k = iparams[_I_TOP_K]
    flags = torch.stack([((top_k > 0) & (top_k < vocab)).any(), (fparams[_F_TOP_P] < 1).any(),
                         (fparams[_F_MIN_P] > 0).any()]).tolist()  # the one synchronisation
    packed = PackedRows(key=key, fparams=fparams, iparams=iparams, any_k=flags[0], any_p=flags[1],
                        any_filter=any(flags), workspaces={})
    rows.__dict__["_kernel_pack"] = packed
    return packed


def _step_argument(step: torch.Tensor | int, batch: int, device: torch.device):
    """(step tensor or None, scalar step): a [B] int64 tensor on the device is used as it is (no op)."""
    if isinstance(step, int):
        return None, step
    if (isinstance(step, torch.Tensor) and step.dtype == torch.int64 and step.device == device
            and step.shape == (batch,) and step.stride(0) == 1):
        return step, 0  # the decoding loop's per-row steps: nothing to do
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    if step.ndim == 0:
        step = step.expand(batch)
    if tuple(step.shape) != (batch,):
        raise ValueError(f"step must be an int, a scalar tensor or shape ({batch},), got {tuple(step.shape)}")
    return step.contiguous(), 0


def _launch_shape(batch: int, vocab: int, device: torch.device, block: int | None, splits: int | None,
                  pivots: int | None):
    """(BLOCK, SEARCH_BLOCK, NUM_PIVOTS, number of splits, tiles per split, num_warps).

    BLOCK is the tile: on a GPU fixed (no autotuning: tokens and log-probs are bitwise repeatable for a
    fixed BLOCK). The vocabulary is split so that about two programs per SM run when the batch alone
    cannot fill the GPU. Under the interpreter every program costs Python overhead, so tiles are as large
    as the row (up to 4096) and rows are not split unless asked.
    """
    if block is None:
        block = min(BLOCK_GPU if device.type == "cuda" else 4096, max(16, triton.next_power_of_2(vocab)))
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    search_block = min(SEARCH_BLOCK_GPU if device.type == "cuda" else 1024, block)
    # Pivots per search pass: passes = search_passes(pivots). On a GPU the [SEARCH_BLOCK, pivots] compare
    # tile must fit in registers; under the interpreter each pass costs Python overhead and the tile is one
    # numpy op, so fewer, wider passes win.
    if pivots is None:
        pivots = PIVOTS_GPU if device.type == "cuda" else 256
    if pivots < 2 or pivots & (pivots - 1):
        raise ValueError(f"pivots must be a power of two >= 2, got {pivots}")
    n_tiles = triton.cdiv(vocab, block)
    if splits is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = triton.cdiv(2 * sms, batch)
        else:
            splits = 1
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    splits = min(splits, n_tiles, MAX_SPLITS)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    num_warps = 8 if block >= 2048 else 4
    return block, search_block, pivots, splits, tiles_per_split, num_warps


def _workspace(packed: PackedRows, batch: int, vocab: int, device: torch.device, block: int, n_splits: int,
               pivots: int, n_passes: int) -> dict:
    """Scratch buffers of one launch shape, kept with the packed rows (reused while the batch lasts)."""
    shape_key = (vocab, block, n_splits, pivots, n_passes)
    ws = packed.workspaces.get(shape_key)
    if ws is None:
        n_tiles = triton.cdiv(vocab, block)
        f32 = dict(dtype=torch.float32, device=device)
        ws = dict(
            tile_m=torch.empty(batch, n_tiles, **f32), tile_s=torch.empty(batch, n_tiles, **f32),
            kept_s=torch.empty(batch, n_tiles, **f32), lse=torch.empty(batch, **f32),
            cut=torch.empty(batch, dtype=torch.int32, device=device), row_max=torch.empty(batch, **f32),
            part_score=torch.empty(batch, n_splits, **f32), part_z=torch.empty(batch, n_splits, **f32),
            part_idx=torch.empty(batch, n_splits, dtype=torch.int32, device=device),
            lo=torch.empty(n_passes + 1, batch, dtype=torch.int64, device=device),
            hi=torch.empty(n_passes + 1, batch, dtype=torch.int64, device=device),
            cnt=torch.empty(max(n_passes, 1), batch, n_splits, pivots, dtype=torch.int32, device=device),
            mass=torch.empty(max(n_passes, 1), batch, n_splits, pivots, **f32),
            dmass=torch.empty(batch, n_splits, **f32),
        )
        packed.workspaces[shape_key] = ws
    return ws


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
    pivots: int | None = None,
) -> SampleOutput:
    """The Triton twin of `reference.mix_and_sample_reference` (same arguments, same law, same draws).

    policy: [B, V] scores; guides: up to MAX_GUIDES tensors [B, V] (fp32, bf16 or fp16 each);
    weights: [B, R]; rows: per-row settings (temperature, top-k/p, min-p, greedy, seed), packed once per
    object (`pack_rows`); step: the row's decoding step (int or [B] tensor), the second half of the random
    key; noise: optional [B, V] Gumbel noise replacing the inverse CDF (tests). `block` (the tile),
    `splits` and `pivots` override the launch shape (tests, benchmarks).
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
        if weights.device != device or weights.stride(-1) != 1:
            weights = weights.to(device).contiguous()
    else:
        weights = policy  # never read: NUM_GUIDES = 0
    if noise is not None:
        noise = _check_scores("noise", noise, shape, device)
    if rows is None:
        rows = SamplingRows.build(batch, device=device)
    step_tensor, step_value = _step_argument(step, batch, device)
    block, search_block, pivots, n_splits, tiles_per_split, num_warps = _launch_shape(
        batch, vocab, device, block, splits, pivots)
    packed = pack_rows(rows, batch, vocab, device)
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            "the Triton mix-and-sample kernel needs CUDA tensors (CPU tensors run only under the Triton "
            "interpreter: TRITON_INTERPRET=1 set before triton is imported); use kernels.sample_next, which "
            "sends CPU tensors to the torch reference")
    per_filter = search_passes(pivots)
    n_k = per_filter if packed.any_k else 0
    n_passes = n_k + (per_filter if packed.any_p else 0)
    ws = _workspace(packed, batch, vocab, device, block, n_splits, pivots, n_passes)
    n_tiles = triton.cdiv(vocab, block)
    chunk = tiles_per_split * block
    splits_p2 = triton.next_power_of_2(n_splits)
    # Compiled launches must not contract w * g + z into an FMA: z would differ from the reference's.
    options = {} if INTERPRETED else {"enable_fp_fusion": False}
    inputs = (policy, policy.stride(0), guides, tuple(g.stride(0) for g in guides), weights, weights.stride(0))
    settings = (packed.fparams, packed.iparams, batch)
    noise_args = (noise if noise is not None else policy, noise.stride(0) if noise is not None else 0)
    parts = (ws["part_score"], ws["part_idx"], ws["part_z"])
    has_noise = noise is not None

    _tiles_kernel[(batch, n_splits)](
        *inputs, *settings, *noise_args, ws["tile_m"], ws["tile_s"], *parts, vocab, n_tiles, tiles_per_split,
        n_splits, NUM_GUIDES=len(guides), HAS_NOISE=has_noise, BLOCK=block, num_warps=num_warps, **options)
    if packed.any_filter:
        search = (ws["row_max"], ws["lo"], ws["hi"], ws["cnt"], ws["mass"], ws["dmass"])
        _search_init_kernel[(batch,)](*settings, ws["tile_m"], n_tiles, ws["row_max"], ws["lo"], ws["hi"], vocab,
                                      TILES=TILE_SCAN, num_warps=4)
        for n in range(n_passes):
            _search_pass_kernel[(batch, n_splits)](
                *inputs, *settings, *search, n, n_k, vocab, chunk, n_splits,
                NUM_GUIDES=len(guides), TOP_P=n >= n_k, SEARCH_BLOCK=search_block, NUM_PIVOTS=pivots,
                SPLITS=splits_p2, num_warps=8, **options)
        _kept_tiles_kernel[(batch, n_splits)](
            *inputs, *settings, *noise_args, *search, n_passes, n_k, ws["cut"], ws["tile_m"], ws["kept_s"],
            *parts, vocab, n_tiles, tiles_per_split, n_splits,
            NUM_GUIDES=len(guides), HAS_NOISE=has_noise, BLOCK=block, NUM_PIVOTS=pivots, SPLITS=splits_p2,
            num_warps=num_warps, **options)

    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprob = torch.empty(batch, dtype=torch.float32, device=device)
    _finish_kernel[(batch,)](
        *inputs, *settings, step_tensor if step_tensor is not None else packed.iparams, step_value,
        ws["tile_m"], ws["tile_s"], ws["kept_s"], ws["cut"], *parts, n_splits, tokens, logprob, ws["lse"],
        vocab, n_tiles, NUM_GUIDES=len(guides), HAS_NOISE=has_noise, ANY_FILTER=packed.any_filter,
        STEP_PER_ROW=step_tensor is not None, SPLITS=splits_p2, BLOCK=block, TILES=TILE_SCAN,
        num_warps=num_warps, **options)

    logprobs = None
    if return_logprobs:
        logprobs = torch.empty(batch, vocab, dtype=torch.float32, device=device)
        _logprobs_kernel[(batch, n_splits)](
            *inputs, packed.fparams, ws["lse"], ws["cut"], logprobs, logprobs.stride(0), vocab, chunk,
            NUM_GUIDES=len(guides), BLOCK=block, num_warps=num_warps, **options)
    return SampleOutput(tokens=tokens, logprob=logprob, logprobs=logprobs)
