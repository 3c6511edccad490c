"""vLLM throughput with the align-decode plugin, against this project's Hugging Face backend.

Variants, each generating the same number of tokens for the same prompts (greedy, fixed length):

    vllm-plain          vLLM with the plugin's entry point removed (what vLLM does without align-decode)
    vllm-idle           plugin installed, no guides configured                     (target: within 2%)
    vllm-unused         plugin installed, guides loaded, requests do not opt in    (target: within 2%)
    vllm-genarm         GenARM through the plugin: every request guided by the ARM, weight 1
    hf-plain            align-decode's Hugging Face backend, plain decoding (AlignedModel, Sample)
    hf-genarm           align-decode's Hugging Face backend, GenARM with the same ARM and weight

Every variant runs in its own process (vLLM decides at engine start-up which processors to load). The
variants are run in passes, each pass in the reverse order of the previous one, so slow drift on a
shared machine hits them alike; each process times `--rounds` rounds after one warm-up round, and the
table gives the median over all rounds with the range. Greedy outputs are compared across variants as a
sanity check (plain vs plugin-unused must match; vLLM GenARM vs the Hugging Face GenARM should).

Default models: SmolLM2-135M-Instruct (the project's bundled default, converted once into the cache by
the main environment) as the policy and, standing in for a trained ARM of the same size, as the ARM.

    .venv-vllm/bin/python benchmarks/bench_vllm.py --threads 1 --prompts 8 --tokens 64 --rounds 3 --passes 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from chat_prompts import PROMPTS  # beside this script

VARIANTS = ["vllm-plain", "vllm-idle", "vllm-unused", "vllm-genarm", "hf-plain", "hf-genarm"]


def default_model() -> str:
    from align_decode.models import default_model_path

    path = default_model_path(convert=False)
    if not (path / "config.json").exists():
        raise SystemExit(
            f"the default model is not converted yet ({path}); convert it once from the main environment:\n"
            "  .venv/bin/python -c 'from align_decode.models import default_model_path; default_model_path()'\n"
            "or pass --policy/--arm model folders"
        )
    return str(path)


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for t in texts]
    return [tokenizer(t)["input_ids"] for t in texts]


# ------------------------------------------------------------------------------------------- workers
PLUGIN_SECONDS = [0.0]  # time spent inside the plugin's methods (this process)


def time_plugin() -> None:
    """Wrap the processor's entry points with timers: the plugin's own share of each round is measured
    directly, which machine noise cannot hide the way it hides a 2% throughput difference."""
    from align_decode.serving.vllm_plugin.processor import GuidanceLogitsProcessor as P

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                PLUGIN_SECONDS[0] += time.perf_counter() - start
        return wrapper

    for name in ("update_state", "apply", "add_request"):
        setattr(P, name, timed(getattr(P, name)))
    P.validate_params = classmethod(timed(P.validate_params.__func__))


def run_vllm(args, variant: str, prompts: list[list[int]]):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if variant == "vllm-plain":
        # vLLM as it is without align-decode: its entry-point loader finds no plugin.
        import vllm.v1.sample.logits_processor as lp

        lp._load_logitsprocs_plugins = lambda: []
    if variant in ("vllm-unused", "vllm-genarm"):
        os.environ["ALIGN_DECODE_GUIDES"] = json.dumps({"arm": {"path": args.arm, "kind": "arm"}})
    else:
        os.environ.pop("ALIGN_DECODE_GUIDES", None)
    from vllm import LLM, SamplingParams

    if variant != "vllm-plain":
        time_plugin()
    llm = LLM(model=args.policy, dtype="float32", max_model_len=args.max_model_len, max_num_seqs=len(prompts),
              enforce_eager=True, seed=0)
    extra = {"align_decode": {"guides": {"arm": args.weight}}} if variant == "vllm-genarm" else None
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=extra)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def once():
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    return once


def run_hf(args, variant: str, prompts: list[list[int]]):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align_decode import ARM, AlignedModel, GenARM
    from align_decode.decoding.prompts import left_pad

    tok = AutoTokenizer.from_pretrained(args.policy)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval()
    strategy = None
    if variant == "hf-genarm":
        arm = AutoModelForCausalLM.from_pretrained(args.arm, dtype=torch.float32).eval()
        strategy = GenARM(ARM(arm, AutoTokenizer.from_pretrained(args.arm)), weights=[args.weight])
    aligned = AlignedModel(policy, tok, strategy=strategy)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad)
    # A stop id the model never emits in these runs: every row generates exactly --tokens tokens.
    never = len(tok) - 1

    def once():
        out = aligned.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens, do_sample=False,
                               eos_token_id=never, pad_token_id=pad)
        return [row[ids.shape[1]:].tolist() for row in out]

    return once


def worker(args) -> None:
    from transformers import AutoTokenizer

    prompts = prompt_ids(AutoTokenizer.from_pretrained(args.policy), args.prompts)
    variant = args.worker
    once = (run_vllm if variant.startswith("vllm") else run_hf)(args, variant, prompts)
    outputs = once()  # warm-up (and the outputs compared across variants)
    for r in range(args.rounds):
        PLUGIN_SECONDS[0] = 0.0
        start = time.perf_counter()
        got = once()
        seconds = time.perf_counter() - start
        tokens = sum(len(o) for o in got)
        print("RESULT " + json.dumps({"variant": variant, "round": r, "tokens": tokens, "seconds": seconds,
                                      "tok_s": tokens / seconds, "plugin_s": PLUGIN_SECONDS[0]}), flush=True)
    print("OUTPUTS " + json.dumps({"variant": variant, "outputs": outputs}), flush=True)


# -------------------------------------------------------------------------------------- orchestrator
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", help="policy model folder (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--arm", help="ARM model folder (default: the policy's folder)")
    ap.add_argument("--weight", type=float, default=1.0, help="GenARM weight (1/beta)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per process, after one warm-up")
    ap.add_argument("--passes", type=int, default=2, help="passes over the variants, alternating order")
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS for every variant (1 is stable on a shared machine; more threads "
                         "spin-wait badly when other work holds the cores)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/out/bench_vllm.json", help="raw results (JSON)")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.policy = args.policy or default_model()
    args.arm = args.arm or args.policy
    if args.worker:
        worker(args)
        return

    rows, outputs, startup = [], {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    base = [sys.executable, os.path.abspath(__file__), "--policy", args.policy, "--arm", args.arm,
            "--weight", str(args.weight), "--prompts", str(args.prompts), "--tokens", str(args.tokens),
            "--rounds", str(args.rounds), "--max-model-len", str(args.max_model_len)]
    for p in range(args.passes):
        order = args.variants if p % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            start = time.perf_counter()
            proc = subprocess.run(base + ["--worker", variant], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
            startup.setdefault(variant, []).append(time.perf_counter() - start)
            for line in proc.stdout.splitlines():
                if line.startswith("RESULT "):
                    rows.append(json.loads(line[7:]))
                elif line.startswith("OUTPUTS "):
                    outputs[variant] = json.loads(line[8:])["outputs"]
            done = [r["tok_s"] for r in rows if r["variant"] == variant]
            print(f"pass {p + 1} {variant:12s} {statistics.median(done[-args.rounds:]):8.1f} tok/s", flush=True)

    import torch

    import vllm

    print(f"\n{args.prompts} prompts x {args.tokens} new tokens, greedy, batch decoded together; "
          f"{args.rounds} rounds x {args.passes} passes per variant; policy {Path(args.policy).name}, "
          f"ARM {Path(args.arm).name}, weight {args.weight}")
    print(f"vllm {vllm.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={args.threads}, load average {os.getloadavg()[0]:.1f} at the end\n")
    ref = statistics.median([r["tok_s"] for r in rows if r["variant"] == "vllm-plain"]) \
        if any(r["variant"] == "vllm-plain" for r in rows) else None
    print("| variant | tok/s (median) | range | vs vllm-plain | time inside the plugin |")
    print("|---|---|---|---|---|")
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        v = [r["tok_s"] for r in mine]
        rel = f"{100 * (statistics.median(v) / ref - 1):+.1f}%" if ref else "-"
        share = "-"
        if variant.startswith("vllm") and variant != "vllm-plain":
            share = f"{100 * sum(r['plugin_s'] for r in mine) / sum(r['seconds'] for r in mine):.3f}% of wall time"
        print(f"| {variant} | {statistics.median(v):.1f} | {min(v):.1f}-{max(v):.1f} | {rel} | {share} |")
    checks = [("vllm-plain", "vllm-idle"), ("vllm-plain", "vllm-unused"), ("vllm-genarm", "hf-genarm"),
              ("vllm-plain", "hf-plain")]
    print()
    for a, b in checks:
        if a in outputs and b in outputs:
            same = sum(x == y for x, y in zip(outputs[a], outputs[b]))
            print(f"greedy outputs {a} vs {b}: {same}/{len(outputs[a])} identical")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": rows,
                               "process_seconds": startup}, indent=1))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
