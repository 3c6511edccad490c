"""GenARM with the guides run inside vLLM (composite model) against plain vLLM and the processor path.

All engines live in one process (in-process V1 engines, VLLM_ENABLE_V1_MULTIPROCESSING=0) and are timed
in interleaved rounds (round r runs every variant once, in an order rotated each round), so machine
load drifts hit them alike. Greedy, fixed length (ignore_eos), the same prompts for every variant.

    plain        vLLM on the policy (the plugin's entry point installed, no guides: idle)
    composite    the composite folder (policy + same-size guide in one vLLM model), every request guided
    composite-q  the composite folder with a guide of a quarter of the policy's layers (--quarter)
    processor    the old path: ALIGN_DECODE_GUIDES names the guide, run by the processor beside vLLM

Default: SmolLM2-135M-Instruct (the bundled default) as the policy and, standing in for a same-size
ARM, as the guide; the quarter-size guide is its first quarter of blocks (written to --work).

    .venv-vllm/bin/python benchmarks/bench_vllm_composite.py --prompts 8 --tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import PROMPTS  # noqa: E402


def default_model() -> str:
    from align_decode.models import default_model_path

    return str(default_model_path(convert=False))


def quarter_guide(policy: str, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    keep = max(1, model.config.num_hidden_layers // 4)
    model.model.layers = model.model.layers[:keep]
    model.config.num_hidden_layers = keep
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=None)
    ap.add_argument("--guide", default=None, help="same-size guide folder (default: the policy)")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["plain", "composite", "composite-q", "processor"])
    ap.add_argument("--work", default="benchmarks/out/composite")
    ap.add_argument("--out", default="benchmarks/out/bench_vllm_composite.json")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine: several engines share the process
    os.environ.pop("ALIGN_DECODE_GUIDES", None)
    policy = args.policy or default_model()
    guide = args.guide or policy
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from align_decode.serving.composite.spec import build_composite

    tok = AutoTokenizer.from_pretrained(policy)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for t in texts]
    folders = {"plain": policy, "processor": policy}
    if "composite" in args.variants:
        folders["composite"] = build_composite(policy, {"arm": guide}, work / "same", force=True)["out"]
    if "composite-q" in args.variants:
        q = quarter_guide(policy, work / "quarter-guide")
        folders["composite-q"] = build_composite(policy, {"arm": q}, work / "quarter", force=True)["out"]

    from vllm import LLM, SamplingParams

    engines, params = {}, {}
    for v in args.variants:
        if v == "processor":
            os.environ["ALIGN_DECODE_GUIDES"] = json.dumps({"arm": {"path": guide, "kind": "arm"}})
        else:
            os.environ.pop("ALIGN_DECODE_GUIDES", None)
        engines[v] = LLM(model=folders[v], dtype="float32", max_model_len=512, max_num_seqs=args.prompts,
                         enforce_eager=True, seed=0)
        extra = None if v == "plain" else {"align_decode": {"guides": {"arm": args.weight}}}
        params[v] = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True, extra_args=extra)
    inputs = [{"prompt_token_ids": p} for p in prompts]

    def once(v):
        outs = engines[v].generate(inputs, params[v], use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    outputs = {v: once(v) for v in args.variants}  # warm-up; outputs compared below
    load_before = os.getloadavg()
    rows = []
    for r in range(args.rounds):
        order = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
        for v in order:
            start = time.perf_counter()
            got = once(v)
            s = time.perf_counter() - start
            n = sum(len(o) for o in got)
            rows.append({"variant": v, "round": r, "tokens": n, "seconds": s, "tok_s": n / s})
            print(json.dumps(rows[-1]), flush=True)
    load_after = os.getloadavg()
    med = {v: statistics.median(x["tok_s"] for x in rows if x["variant"] == v) for v in args.variants}
    ratio = {}
    for v in args.variants:
        # Per-round ratio to the same round's plain run, then the median: drift cancels within a round.
        per = [x["tok_s"] / next(y["tok_s"] for y in rows if y["variant"] == "plain" and y["round"] == x["round"])
               for x in rows if x["variant"] == v] if "plain" in med else []
        ratio[v] = statistics.median(per) if per else None
    print(f"\nload average before {load_before}, after {load_after}; {args.prompts} prompts x {args.tokens} tokens")
    print("| variant | median tok/s | x plain (median of per-round ratios) | min-max tok/s |")
    print("|---|---|---|---|")
    for v in args.variants:
        vals = [x["tok_s"] for x in rows if x["variant"] == v]
        print(f"| {v} | {med[v]:.1f} | {ratio[v]:.3f} | {min(vals):.1f}-{max(vals):.1f} |")
    if "composite" in outputs and "processor" in outputs:
        same = sum(a == b for a, b in zip(outputs["composite"], outputs["processor"]))
        print(f"greedy outputs, composite vs processor path: {same}/{len(prompts)} prompts identical")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "median": med, "ratio": ratio, "load": [load_before, load_after],
                                          "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
