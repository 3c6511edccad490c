"""The GPU hot path of issue 19, every target in one run (CUDA; `--dry-run` checks the script on CPU).

    python benchmarks/bench_gpu_hotpath.py --all            # on a GPU: every section, markdown on stdout
    python benchmarks/bench_gpu_hotpath.py --host           # the host-cost micro-benchmark alone (CPU or GPU)
    python benchmarks/bench_gpu_hotpath.py --all --dry-run  # CPU, tiny sizes, kernels under TRITON_INTERPRET=1

Sections (each prints a markdown table with its target):
  --check      the compiled kernel's own draws against the torch reference (inverse CDF at the same
               row_uniform: the tokens must agree, at most a rounding-level stray), plain and truncated;
  --bandwidth  bf16 with one guide at B*V >= 1e7: GPU time from CUDA-graph replays, L2 flushed, as a
               fraction of HBM bandwidth (target >= 80%), with tile sizes 1024 / 2048 / 4096;
  --truncation top-k 50 + top-p 0.9 on every row at B = 1 and 64 (V = 128256, bf16, one guide): the
               kernel (16 / 64 / 256 pivots per search pass) against eager torch's sort-based truncation,
               eager launches (host included) and CUDA-graph replays (target >= 3x eager torch);
  --host       host cost per step: the Python-side preparation of a call (settings packing, step,
               workspaces) before (per step, as the kernel of issue 5 did) and after (packed once per
               batch), and the wall time per call of back-to-back kernel calls at B = 1 (target < 30 us);
  --e2e        end to end: runs `bench_gpu_decode.py --batches 16 --tokens 64` (GenARM >= 0.45x
               model.generate(), the loop at weight 0 >= 1x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from align_decode.kernels import SamplingRows  # noqa: E402
from align_decode.kernels.reference import mix_and_sample_reference, truncate  # noqa: E402
from bench_kernels import graphed as graph_replay  # noqa: E402  (beside this script)

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("all", "check", "bandwidth", "truncation", "host", "e2e"):
        p.add_argument(f"--{name}", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, kernels under the interpreter")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--peak-gbps", type=float, default=None, help="HBM bandwidth (default: from the device name)")
    args = p.parse_args(argv)
    if args.all:
        for name in ("check", "bandwidth", "truncation", "host", "e2e"):
            setattr(args, name, True)
    if not any(getattr(args, n) for n in ("check", "bandwidth", "truncation", "host", "e2e")):
        p.error("choose a section or --all")
    return args


class Clock:
    """Median time of a callable in microseconds: CUDA events with the L2 flushed on a GPU, perf_counter
    on CPU (the dry run: interpreter times mean nothing)."""

    def __init__(self, device: str, iters: int):
        self.cuda, self.iters = device == "cuda", iters
        if self.cuda:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
            self.flush = torch.empty(max(4 * l2, 256 * 2**20), dtype=torch.int8, device="cuda")

    def __call__(self, fn, warmup: int = 3) -> float:
        for _ in range(warmup):
            fn()
        if not self.cuda:
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e6
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def graphed(fn, device: str):
    """fn captured in a CUDA graph after warm-up calls (which also pack the rows); on CPU fn itself."""
    return fn if device != "cuda" else graph_replay(fn)


def inputs(batch, vocab, n_guides, dtype, device, **settings):
    gen = torch.Generator(device=device).manual_seed(0)
    policy = (3 * torch.randn(batch, vocab, device=device, generator=gen)).to(dtype)
    guides = [torch.randn(batch, vocab, device=device, generator=gen).to(dtype) for _ in range(n_guides)]
    weights = torch.rand(batch, n_guides, device=device, generator=gen) + 0.5
    rows = SamplingRows.build(batch, temperature=0.8, seed=torch.arange(batch), device=device, **settings)
    return policy, guides, weights, rows


def eager(policy, guides, weights, rows, top_k: int, top_p: float):
    """Eager torch: normalise each model, mix, normalise, sort-based truncation, multinomial."""
    mixed = torch.log_softmax(policy.float() / rows.temperature.unsqueeze(-1), dim=-1)
    for i, g in enumerate(guides):
        mixed = mixed + weights[:, i : i + 1] * torch.log_softmax(g.float(), dim=-1)
    logp = torch.log_softmax(mixed, dim=-1)
    if top_k or top_p < 1:
        logp = truncate(logp, rows.top_k, rows.top_p, rows.min_p)
    tokens = torch.multinomial(logp.exp(), 1)
    return tokens.squeeze(-1), logp.gather(-1, tokens).squeeze(-1)


def section_check(device, small):
    from align_decode.kernels.triton_mix import mix_and_sample_triton

    batch, vocab = (6, 700) if small else (64, 128256)
    lines = ["### The kernel's own draws against the reference (same row_uniform)\n",
             "| rows | B | V | tokens that differ |", "|---|---|---|---|"]
    bad = 0
    for name, settings in (("plain", {}), ("top-k / top-p", dict(top_k=50, top_p=0.9))):
        policy, guides, weights, rows = inputs(batch, vocab, 1, torch.bfloat16, device, **settings)
        out = mix_and_sample_triton(policy, guides, weights, rows, 3)
        ref = mix_and_sample_reference(policy, guides, weights, rows, 3)
        diff = int((out.tokens != ref.tokens).sum())
        bad += diff > max(1, batch // 64)
        lines.append(f"| {name} | {batch} | {vocab} | {diff} |")
    print("\n".join(lines) + "\n", flush=True)
    return bad


def section_bandwidth(device, clock, peak, small):
    from align_decode.kernels.triton_mix import mix_and_sample_triton

    configs = [(4, 3000)] if small else [(128, 128256), (256, 128256), (256, 151936)]
    blocks = [1024] if small else [1024, 2048, 4096]
    lines = [f"### bf16, one guide, no truncation: GPU time (CUDA-graph replays, L2 flushed); peak {peak:.0f} GB/s;"
             " target >= 80%\n",
             "| B | V | B*V | rows | tile | us | GB/s | % of peak |", "|---|---|---|---|---|---|---|---|"]
    best = 0.0
    for batch, vocab in configs:
        for greedy in (False, True):
            policy, guides, weights, rows = inputs(batch, vocab, 1, torch.bfloat16, device, greedy=greedy)
            step = torch.zeros(batch, dtype=torch.int64, device=device)
            nbytes = batch * vocab * 2 * 2
            for block in blocks:
                def fn():
                    return mix_and_sample_triton(policy, guides, weights, rows, step, block=block)
                us = clock(graphed(fn, device))
                gbps = nbytes / (us * 1e-6) / 1e9
                if not greedy:
                    best = max(best, gbps / peak)
                lines.append(f"| {batch} | {vocab} | {batch * vocab:.1e} | {'greedy' if greedy else 'sampled'} | "
                             f"{block} | {us:.1f} | {gbps:.0f} | {100 * gbps / peak:.0f}% |")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines) + f"\n\nbest sampled: {100 * best:.0f}% of peak\n", flush=True)


def section_truncation(device, clock, small):
    from align_decode.kernels.triton_mix import mix_and_sample_triton

    vocab = 3000 if small else 128256
    lines = ["### top-k 50 + top-p 0.9 on every row, bf16, one guide: kernel against eager torch (sort); "
             "target >= 3x\n",
             "| B | V | pivots | launches | kernel us | eager torch us | eager / kernel |", "|---|---|---|---|---|---|---|"]
    for batch in ((1, 4) if small else (1, 64)):
        policy, guides, weights, rows = inputs(batch, vocab, 1, torch.bfloat16, device, top_k=50, top_p=0.9)
        step = torch.zeros(batch, dtype=torch.int64, device=device)
        base = clock(lambda: eager(policy, guides, weights, rows, 50, 0.9))
        for pivots in ((256,) if small else (16, 64, 256)):
            def fn():
                return mix_and_sample_triton(policy, guides, weights, rows, step, pivots=pivots)
            for mode, f in (("eager launches", fn), ("CUDA graph", graphed(fn, device) if device == "cuda" else None)):
                if f is None:
                    continue
                us = clock(f)
                lines.append(f"| {batch} | {vocab} | {pivots} | {mode} | {us:.1f} | {base:.1f} | {base / us:.2f}x |")
                print(lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines) + "\n", flush=True)


def _prepare_per_step(policy, rows, step, n_splits):
    """The host-side preparation the kernel of issue 5 did on every call (its `_row_column` per setting,
    `_step_column`, five partial buffers and four outputs), kept here to measure against."""
    device, (batch, _) = policy.device, policy.shape
    cols = [getattr(rows, name).to(device=device, dtype=dtype).contiguous() for name, dtype in
            (("temperature", torch.float32), ("top_k", torch.int64), ("top_p", torch.float32),
             ("min_p", torch.float32), ("greedy", torch.int8), ("seed", torch.int64))]
    step = torch.as_tensor(step, dtype=torch.int64, device=device)
    if step.ndim == 0:
        step = step.expand(batch)
    step = step.contiguous()
    parts = [torch.empty(batch, n_splits, dtype=torch.float32, device=device) for _ in range(4)]
    parts.append(torch.empty(batch, n_splits, dtype=torch.int32, device=device))
    outs = [torch.empty(batch, dtype=dt, device=device) for dt in (torch.int64, torch.float32, torch.float32, torch.int32)]
    return cols, step, parts, outs


def _prepare_packed(policy, rows, step, n_splits):
    """The preparation now: packed settings and workspaces cached per rows object, two outputs."""
    from align_decode.kernels.triton_mix import _step_argument, _workspace, pack_rows

    device, (batch, vocab) = policy.device, policy.shape
    packed = pack_rows(rows, batch, vocab, device)
    step_tensor, value = _step_argument(step, batch, device)
    ws = _workspace(packed, batch, vocab, device, 2048, n_splits, 16, 0)
    outs = [torch.empty(batch, dtype=dt, device=device) for dt in (torch.int64, torch.float32)]
    return packed, step_tensor, ws, outs


def section_host(device, small, clock):
    from align_decode.kernels.triton_mix import mix_and_sample_triton

    lines = ["### Host cost per step (Python side), median us per call\n",
             "| batch | what | per step before (issue 5) | packed once per batch (now) |", "|---|---|---|---|"]
    for batch in (1, 16, 64):
        policy, guides, weights, rows = inputs(batch, 1000, 1, torch.float32, device)
        step = torch.zeros(batch, dtype=torch.int64, device=device)
        n = 2000

        def per_call(fn):
            for _ in range(50):
                fn(policy, rows, step, 4)
            t0 = time.perf_counter()
            for _ in range(n):
                fn(policy, rows, step, 4)
            return (time.perf_counter() - t0) / n * 1e6

        before, after = per_call(_prepare_per_step), per_call(_prepare_packed)
        lines.append(f"| {batch} | settings, step, buffers | {before:.1f} | {after:.1f} |")
    if not small or device == "cuda":
        # Back-to-back calls without synchronising: at B = 1 the GPU work is a few us, so the wall time per
        # call is the host's (Python, argument handling, Triton launches).
        policy, guides, weights, rows = inputs(1, 32000, 1, torch.bfloat16, device)
        step = torch.zeros(1, dtype=torch.int64, device=device)
        for filtered_rows, label in ((rows, "plain"),
                                     (SamplingRows.build(1, top_k=50, top_p=0.9, device=device), "top-k + top-p")):
            def call():
                return mix_and_sample_triton(policy, guides, weights, filtered_rows, step)
            for _ in range(20):
                call()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(500):
                call()
            wall = (time.perf_counter() - t0) / 500 * 1e6
            torch.cuda.synchronize()
            gpu = clock(graphed(call, device))
            lines.append(f"| 1 | whole call, {label}: wall per call / GPU time (graph) | | {wall:.1f} / {gpu:.1f} |")
    print("\n".join(lines) + "\n\ntarget: < 30 us per step on the host\n", flush=True)


def section_e2e(small):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_decode.py"), "--batches", "16", "--tokens", "64"]
    if small:
        print(f"### End to end: skipped in the dry run; the GPU run executes: {' '.join(cmd[1:])}\n", flush=True)
        return
    print("### End to end (targets: GenARM >= 0.45x model.generate(), loop at weight 0 >= 1x)\n", flush=True)
    subprocess.run(cmd, check=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_hotpath.py needs a CUDA GPU (or --dry-run on CPU); nothing was measured.")
    small = args.dry_run
    clock = Clock(device, 3 if small else args.iters)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run, Triton interpreter)"
    peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), 3350.0)
    import triton

    print(f"## GPU hot path (issue 19) on {name}: torch {torch.__version__}, triton {triton.__version__}\n", flush=True)
    bad = 0
    if args.check:
        bad = section_check(device, small)
    if args.bandwidth:
        section_bandwidth(device, clock, peak, small)
    if args.truncation:
        section_truncation(device, clock, small)
    if args.host:
        section_host(device, small, clock)
    if args.e2e:
        section_e2e(small)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
