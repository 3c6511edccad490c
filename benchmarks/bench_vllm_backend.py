"""Best-of-N sampling throughput: the vLLM engine against the in-process (Hugging Face) engine.

Variants, each drawing n sampled candidates (T = 1, no truncation) for the same chat prompts with the
same per-prompt seeds, scored by a cheap token-id reward so that sampling dominates:

    hf            BestOfN(engine=None): this package's loop on the transformers model (max_rows rows a pass)
    vllm          BestOfN(engine=VLLMEngine(...)): one request per prompt with n draws (torch.compile on)
    vllm-eager    the same with enforce_eager=True (no compilation: faster start-up, slower steps)

Each variant runs in its own process (vLLM binds threads and sets torch's thread count at start-up), in
passes whose order alternates so that drift on a shared machine hits all alike; each process times
`--rounds` rounds after one warm-up round. Candidates differ between engines (other samplers, same law),
so both samples/s and generated tokens/s are reported. Start-up (model load, engine build) is excluded
and reported apart.

    .venv-vllm/bin/python benchmarks/bench_vllm_backend.py --threads 1 --prompts 8 --n 16 --tokens 48
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from chat_prompts import PROMPTS  # beside this script

VARIANTS = ["hf", "vllm", "vllm-eager"]


def worker(args) -> None:
    import torch
    from transformers import AutoTokenizer

    from align_decode import BestOfN
    from align_decode.decoding import PromptBatch, left_pad
    from align_decode.serving.engines import VLLMEngine, engine_generate
    from align_decode.decoding.strategy import Policy
    from align_decode.models import default_model_path, load_model
    from align_decode.rewards import SequenceReward

    class Length(SequenceReward):
        name = "length"

        def score_ids(self, prompt_ids, completion_ids):
            return torch.tensor([float(len(c)) for c in completion_ids])

        def _score(self, prompts, completions):
            raise AssertionError

    path = args.model or str(default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    seeds = list(range(args.prompts))
    gen = dict(max_new_tokens=args.tokens, do_sample=True, temperature=1.0, top_k=0, seed=seeds)

    started = time.perf_counter()
    if args.variant == "hf":
        from align_decode.decoding import GenerationSettings

        model, _ = load_model(path, dtype="float32")
        strategy = BestOfN(Length(), n=args.n, max_rows=args.max_rows)
        settings = GenerationSettings.resolve(model, tok, None, max(map(len, prompts)), seed=seeds,
                                              **{k: v for k, v in gen.items() if k != "seed"})
        batch = PromptBatch(*left_pad(prompts, settings.pad_id))

        def once():
            return strategy.run(Policy(model, tok), batch, settings)
    else:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        engine = VLLMEngine(path, dtype="float32", max_model_len=512, enforce_eager=args.variant == "vllm-eager")
        strategy = BestOfN(Length(), n=args.n, engine=engine)  # no transformers model loads in this process

        def once():
            return engine_generate(strategy, engine, prompts, tokenizer=tok, model_folder=path, **gen)
    load_seconds = time.perf_counter() - started
    once()  # warm-up
    rounds = []
    for _ in range(args.rounds):
        tick = time.perf_counter()
        out = once()
        seconds = time.perf_counter() - tick
        tokens = int(sum(len(c) for per_prompt in out.extras["candidates"] for c in per_prompt))
        rounds.append({"seconds": seconds, "samples": args.prompts * args.n, "tokens": tokens})
    print(json.dumps({"variant": args.variant, "load_seconds": load_seconds, "rounds": rounds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder [default: the bundled SmolLM2-135M-Instruct, converted]")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=16, help="candidates per prompt")
    ap.add_argument("--tokens", type=int, default=48, help="max_new_tokens")
    ap.add_argument("--max-rows", type=int, default=128, help="the hf variant's rows per forward pass")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for every variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # set in the worker processes
    args = ap.parse_args()
    if args.variant:
        worker(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    variants = args.variants.split(",")
    results: dict[str, list] = {v: [] for v in variants}
    loads: dict[str, list] = {v: [] for v in variants}
    for p in range(args.passes):
        for variant in variants if p % 2 == 0 else list(reversed(variants)):
            cmd = [sys.executable, __file__, "--variant", variant] + [
                a for a in sys.argv[1:] if not a.startswith("--variants")]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            results[variant] += data["rounds"]
            loads[variant].append(data["load_seconds"])
    print(f"best-of-{args.n}, {args.prompts} prompts, max_new_tokens {args.tokens}, T=1, {args.threads} thread(s)")
    print(f"{'variant':<12} {'samples/s':>10} {'tokens/s':>10} {'s/round':>9} {'range':>15} {'start-up s':>11}")
    for v in variants:
        rs = results[v]
        secs = [r["seconds"] for r in rs]
        sps = statistics.median(r["samples"] / r["seconds"] for r in rs)
        tps = statistics.median(r["tokens"] / r["seconds"] for r in rs)
        print(f"{v:<12} {sps:>10.1f} {tps:>10.1f} {statistics.median(secs):>9.2f} "
              f"{min(secs):>7.2f}-{max(secs):<7.2f} {statistics.median(loads[v]):>11.1f}")


if __name__ == "__main__":
    main()
