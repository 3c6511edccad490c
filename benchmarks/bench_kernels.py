"""Benchmark the fused Triton mix-and-sample kernel against eager torch and torch.compile (CUDA only).

    python benchmarks/bench_kernels.py                      # the full grid, a markdown table on stdout
    python benchmarks/bench_kernels.py --batch 1 64 --vocab 128256 --guides 1 --dtype bf16 --no-compile

Each configuration samples one token per row from softmax(log_softmax(policy / T) + sum_i w_i
log_softmax(guide_i)) with:
  * triton:   `kernels.triton_mix.mix_and_sample_triton` (one streaming pass of per-tile masses, then a
              two-level inverse CDF that re-reads one tile per row: see its module docstring);
  * eager:    log_softmax of each input, weighted sum, softmax, multinomial, log-prob of the drawn token;
  * compiled: torch.compile of the eager function.
`--top-k` / `--top-p` add truncation: the kernel's split pivot search against the reference's sort-based `truncate`.
Issue 19's targets in one run: `benchmarks/bench_gpu_hotpath.py --all`.

Times are medians over `--iters` launches with the L2 cache flushed before each, so inputs come from HBM.
They include each method's host overhead (Python, allocations, launches), as a decoding loop without
CUDA graphs sees it; `--cuda-graph` replays each method from a captured CUDA graph instead, leaving the
GPU time alone.
"GB/s" is the bytes every method must read (B x V x element size x (1 + R)) over the time: the
achieved fraction of HBM bandwidth (3.35 TB/s on an H100 SXM) says how close a method is to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from align_decode.kernels import SamplingRows  # noqa: E402
from align_decode.kernels.reference import mix_and_sample_reference, truncate  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    parser.add_argument("--guides", type=int, nargs="+", default=[1, 2], help="number of guide score tensors R")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--top-k", type=int, default=0, help="per-row top-k for every method (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="per-row top-p for every method (1: off)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles per shape)")
    parser.add_argument("--no-check", action="store_true", help="skip the agreement check with the reference")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (GPU time only)")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error("--top-k must be >= 0 and --top-p in (0, 1]")
    if args.cuda_graph and (args.top_k or args.top_p < 1):
        parser.error("--cuda-graph cannot capture the eager truncation baseline: it syncs with the host")
    return args


def require_cuda() -> None:
    """Refuse, with the reason, where the kernel cannot run."""
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU: the Triton kernel runs on CUDA tensors only "
                 f"(torch {torch.__version__} sees no CUDA device here). Nothing was measured.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench_kernels.py needs triton: pip install triton==3.7.1 (the version CUDA torch 2.13 pins)")


def eager_mix_and_sample(policy, guides, weights, temperature, top_k: int, top_p: float):
    """The unfused baseline: normalise each model, mix, normalise again, draw."""
    mixed = torch.log_softmax(policy.float() / temperature.unsqueeze(-1), dim=-1)
    for i, g in enumerate(guides):
        mixed = mixed + weights[:, i : i + 1] * torch.log_softmax(g.float(), dim=-1)
    logp = torch.log_softmax(mixed, dim=-1)
    if top_k or top_p < 1:
        batch = logp.shape[0]
        logp = truncate(logp, torch.full((batch,), top_k, device=logp.device),
                        torch.full((batch,), top_p, device=logp.device), torch.zeros(batch, device=logp.device))
    tokens = torch.multinomial(logp.exp(), 1)
    return tokens.squeeze(-1), logp.gather(-1, tokens).squeeze(-1)


class Timer:
    """Median CUDA-event time of a callable, with the L2 cache flushed before each launch."""

    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        self.flush_buffer = torch.empty(max(4 * l2, 256 * 2**20), dtype=torch.int8, device="cuda")

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for start, end in zip(starts, ends):
            self.flush_buffer.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3  # microseconds


def graphed(fn):
    """fn captured in a CUDA graph (after warm-up runs that compile and allocate); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_inputs(batch: int, vocab: int, n_guides: int, dtype: torch.dtype, top_k: int, top_p: float):
    gen = torch.Generator(device="cuda").manual_seed(0)
    policy = (3 * torch.randn(batch, vocab, device="cuda", generator=gen)).to(dtype)
    guides = [torch.randn(batch, vocab, device="cuda", generator=gen).to(dtype) for _ in range(n_guides)]
    weights = torch.rand(batch, n_guides, device="cuda", generator=gen) + 0.5
    rows = SamplingRows.build(batch, temperature=0.8, top_k=top_k, top_p=top_p, seed=torch.arange(batch),
                              device="cuda")
    return policy, guides, weights, rows


def check_agreement(policy, guides, weights, rows) -> str:
    """With supplied noise the kernel must pick the reference's tokens; '' when it does."""
    from align_decode.kernels.triton_mix import mix_and_sample_triton

    u = torch.rand(policy.shape, device="cuda", dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    noise = (-torch.log(-torch.log(u))).float()
    fused = mix_and_sample_triton(policy, guides, weights, rows, 0, noise=noise)
    ref = mix_and_sample_reference(policy, guides, weights, rows, 0, noise=noise)
    bad = int((fused.tokens != ref.tokens).sum())
    err = float((fused.logprob - ref.logprob).abs().max())
    if rows.any_filter:
        # Top-p keeps every token tied at the cut, the reference's sort only some (ties are common in
        # bf16): the renormalised log-prob may differ by the tied mass; the token must not.
        if err > 1e-4:
            print(f"  (filtered rows: max log-prob error {err:.2e}, from ties at the cut)", file=sys.stderr)
        return f"{bad} token(s) differ" if bad else ""
    return f"{bad} token(s) differ, max log-prob error {err:.2e}" if bad or err > 1e-4 else ""


def bench_one(args, timer: Timer, compiled, batch: int, vocab: int, n_guides: int, dtype_name: str) -> dict:
    from align_decode.kernels.triton_mix import mix_and_sample_triton

    dtype = DTYPES[dtype_name]
    policy, guides, weights, rows = make_inputs(batch, vocab, n_guides, dtype, args.top_k, args.top_p)
    step = torch.zeros(batch, dtype=torch.int64, device="cuda")
    result = {"B": batch, "V": vocab, "R": n_guides, "dtype": dtype_name,
              "bytes": batch * vocab * policy.element_size() * (1 + n_guides)}
    if not args.no_check:
        result["check"] = check_agreement(policy, guides, weights, rows)

    def fused():
        # The step stays fixed: repeating noise does not change the time, and a step increment would add
        # a kernel launch to what is measured.
        return mix_and_sample_triton(policy, guides, weights, rows, step)

    def eager():
        return eager_mix_and_sample(policy, guides, weights, rows.temperature, args.top_k, args.top_p)

    def compiled_fn():
        return compiled(policy, guides, weights, rows.temperature, args.top_k, args.top_p)

    methods = {"triton": fused, "eager": eager}
    if compiled is not None:
        methods["compiled"] = compiled_fn
    for name, fn in methods.items():
        try:
            result[name] = timer(graphed(fn) if args.cuda_graph else fn)
        except Exception as err:  # e.g. a compiled graph that cannot be captured: report, go on
            if name == "triton":
                raise
            print(f"B={batch} V={vocab} R={n_guides} {dtype_name}: {name} failed: {err!r}"[:500], file=sys.stderr)
            result[name] = float("nan")
    return result


def table_head(with_compile: bool) -> str:
    head = ["B", "V", "R", "dtype", "triton us", "triton GB/s", "eager us", "eager GB/s", "eager / triton"]
    if with_compile:
        head += ["compile us", "compile GB/s", "compile / triton"]
    return "| " + " | ".join(head) + " |\n|" + "---|" * len(head)


def table_row(r: dict, with_compile: bool) -> str:
    def gbps(key):
        return r["bytes"] / (r[key] * 1e-6) / 1e9

    cells = [str(r["B"]), str(r["V"]), str(r["R"]), r["dtype"],
             f"{r['triton']:.1f}", f"{gbps('triton'):.0f}",
             f"{r['eager']:.1f}", f"{gbps('eager'):.0f}", f"{r['eager'] / r['triton']:.2f}x"]
    if with_compile:
        cells += [f"{r['compiled']:.1f}", f"{gbps('compiled'):.0f}", f"{r['compiled'] / r['triton']:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda()
    compiled = None
    if not args.no_compile:
        from torch import _dynamo as dynamo  # (a plain `import torch._dynamo` would make torch local here)

        # One compiled graph per shape; without a larger cache dynamo would silently fall back to eager.
        dynamo.config.cache_size_limit = 1024
        dynamo.config.accumulated_cache_size_limit = 1024
        compiled = torch.compile(eager_mix_and_sample, dynamic=False)
    timer = Timer(args.iters, args.warmup)
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}, torch {torch.__version__}, top_k={args.top_k}, top_p={args.top_p}, "
          f"cuda_graph={args.cuda_graph}", file=sys.stderr)
    mode = "CUDA-graph replays" if args.cuda_graph else "eager launches"
    # Rows are printed as they are measured, so a run cut short still leaves a table.
    print(f"\n### Fused mix-and-sample on {device}: median us over {args.iters} {mode}, L2 flushed; "
          "GB/s = input bytes / time\n")
    print(table_head(compiled is not None), flush=True)
    results = []
    for dtype_name in args.dtype:
        for n_guides in args.guides:
            for vocab in args.vocab:
                for batch in args.batch:
                    r = bench_one(args, timer, compiled, batch, vocab, n_guides, dtype_name)
                    torch.cuda.empty_cache()  # the inputs died with bench_one: keep the peak at one config
                    results.append(r)
                    msg = (f"B={batch} V={vocab} R={n_guides} {dtype_name}: "
                           f"triton {r['triton']:.1f} us, eager {r['eager']:.1f} us")
                    if r.get("check"):
                        msg += f"  DISAGREES WITH THE REFERENCE: {r['check']}"
                    print(msg, file=sys.stderr)
                    print(table_row(r, compiled is not None), flush=True)
    disagreements = [r for r in results if r.get("check")]
    if disagreements:
        print(f"\n{len(disagreements)} configuration(s) disagreed with the reference (see stderr)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
