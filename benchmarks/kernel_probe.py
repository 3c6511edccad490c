"""Where the fused kernel's time goes (CUDA only): GPU time of kernel variants from CUDA-graph replays,
and the host cost of one eager call.  python benchmarks/kernel_probe.py"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import Timer, graphed, make_inputs  # noqa: E402
from align_decode.kernels import SamplingRows  # noqa: E402
from align_decode.kernels import triton_mix as tm  # noqa: E402


def main():
    timer = Timer(30, 3)
    configs = [(256, 151936, 1, torch.bfloat16), (256, 151936, 2, torch.float32), (8, 128256, 1, torch.bfloat16)]
    for batch, vocab, r, dtype in configs:
        policy, guides, weights, rows = make_inputs(batch, vocab, r, dtype, 0, 1.0)
        nbytes = batch * vocab * policy.element_size() * (1 + r)
        greedy = SamplingRows.build(batch, greedy=True, device="cuda")
        noise = torch.randn(batch, vocab, device="cuda")
        step = torch.zeros(batch, dtype=torch.int64, device="cuda")
        print(f"\n== B={batch} V={vocab} R={r} {dtype} ({nbytes / 1e6:.1f} MB)", flush=True)

        def run(label, rws=rows, probe=0, block=None, warps=None, nz=None, splits=None, stages=None, launch=None):
            tm.PROBE, tm.PROBE_WARPS, tm.PROBE_STAGES, tm.PROBE_LAUNCH_STAGES = probe, warps, stages, launch
            fn = lambda: tm.mix_and_sample_triton(policy, guides, weights, rws, step, noise=nz, block=block, splits=splits)
            t = timer(graphed(fn))
            k = tm.LAST_PARTIALS
            regs = f"regs {k.n_regs} spills {k.n_spills}" if hasattr(k, "n_regs") else ""
            print(f"{label:40s} {t:8.1f} us {nbytes / t / 1e3:7.0f} GB/s  {regs}", flush=True)
            tm.PROBE, tm.PROBE_WARPS, tm.PROBE_STAGES, tm.PROBE_LAUNCH_STAGES = 0, None, None, None

        run("sampled (current)")
        run("greedy rows (no noise)", rws=greedy)
        run("supplied noise", nz=noise)
        run("probe2 philox+reshape, no log", probe=2)
        for stages in (1, 2, 3, 4):
            run(f"tl.range num_stages={stages}", stages=stages)
            run(f"tl.range num_stages={stages} greedy", rws=greedy, stages=stages)
        for launch in (1, 2, 4):
            run(f"launch num_stages={launch}", launch=launch)
        run("warps 16 stages 3", warps=16, stages=3)
        run("block 1024 warps 8 stages 3", block=1024, warps=8, stages=3)
    # Host cost of one eager call (no graph): the decoding loop pays this per step.
    policy, guides, weights, rows = make_inputs(1, 128256, 1, torch.bfloat16, 0, 1.0)
    fn = lambda: tm.mix_and_sample_triton(policy, guides, weights, rows, 0)
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    print(f"\nhost: {(time.perf_counter() - t0) / 200 * 1e6:.1f} us per eager call (B=1)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
