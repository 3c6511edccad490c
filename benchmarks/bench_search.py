"""Step-level search and early-pruned best-of-N against plain best-of-N at equal compute.

On a task of the quality benchmark (`--task`: sentiment, chat prompts scored by VADER's compound; or
non_toxicity, RealToxicityPrompts prefixes continued as text and scored by alt-profanity-check),
SmolLM2-135M-Instruct, held-out prompts, T = 1, every method is scored by the task's reward on its final
answers; the process reward of the searches is the same reward applied to the partial responses
(`PrefixReward`), steps of --step-tokens tokens. Compute is counted, not timed: token positions run through the policy (prefill
once per prompt; forks share it) and reward calls, per prompt, so the numbers do not depend on the load
of the machine. Best-of-N runs as PrunedBestOfN with nothing pruned, which draws best-of-N's candidates
token for token (tests/decoding/test_pruned_best_of_n.py) and counts its forward tokens.

Reported: mean reward +- SE per method and budget, and for each method family the forward tokens it
needs to reach best-of-16's mean reward (linear interpolation between its budgets; "not reached" when its
largest budget stays below).

    python benchmarks/bench_search.py --prompts 16 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from align_decode import DVTS, AlignedModel, ParticleFilter, PrunedBestOfN, StepBeamSearch  # noqa: E402
from align_decode.models import load_model  # noqa: E402
from align_decode.rewards.process import PrefixReward  # noqa: E402
from benchmarks.quality.tasks import TASKS  # noqa: E402


def configurations(reward, step_tokens: int, cap: int):
    """(family, label, strategy factory) at several budgets each."""
    prm = PrefixReward(reward)
    steps = dict(step_delimiter=None, step_tokens=step_tokens, max_steps=math.ceil(cap / step_tokens))
    out = []
    for n in (1, 2, 4, 8, 16, 32):
        out.append(("best-of-N", f"best-of-{n}", lambda n=n: PrunedBestOfN(reward, n=n, keep_fraction=1.0)))
    for n, keep in ((8, 0.25), (16, 0.25), (32, 0.25), (64, 0.25)):
        prune = (step_tokens, 2 * step_tokens)
        out.append(("pruned best-of-N", f"pruned n={n} keep={keep} at {prune}",
                    lambda n=n, keep=keep, prune=prune: PrunedBestOfN(reward, n=n, prune_at=prune, keep_fraction=keep)))
    for n, m in ((4, 2), (8, 2), (16, 4)):
        out.append(("beam search", f"beam n={n} M={m}", lambda n=n, m=m: StepBeamSearch(prm, n=n, beam_width=m, **steps)))
    for n, m in ((4, 2), (8, 2), (16, 4)):
        out.append(("DVTS", f"dvts n={n} M={m}", lambda n=n, m=m: DVTS(prm, n=n, beam_width=m, **steps)))
    for n in (2, 4, 8, 16):
        out.append(("particle filtering", f"pf n={n} tau=0.1",
                    lambda n=n: ParticleFilter(prm, n=n, temperature=0.1, potential="score", **steps)))
    return out


def run(model, tok, task, records, reward, factory, cap: int, seed: int) -> dict:
    tok.padding_side = "left"
    if task.chat_template:
        chats = [[{"role": "user", "content": r.text}] for r in records]
        enc = tok.apply_chat_template(chats, add_generation_prompt=True, return_dict=True, return_tensors="pt",
                                      padding=True)
    else:  # a text to continue (RealToxicityPrompts prefixes)
        enc = tok([r.text for r in records], return_tensors="pt", padding=True, add_special_tokens=False)
    strategy = factory()
    start = time.perf_counter()
    out = AlignedModel(model, tokenizer=tok, strategy=strategy).generate(
        **enc, max_new_tokens=cap, do_sample=True, top_k=0, temperature=1.0, seed=list(range(seed, seed + len(records))),
        return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    width = enc["input_ids"].shape[1]
    texts = tok.batch_decode(out.sequences[:, width:], skip_special_tokens=True)
    scores = reward.score([r.text for r in records], texts).tolist()
    a = out.alignment
    return {"reward": statistics.mean(scores), "se": statistics.stdev(scores) / math.sqrt(len(scores)),
            "forward_tokens": a["forward_tokens"] / len(records), "reward_calls": a["reward_calls"] / len(records),
            "sampled_tokens": a["sampled_tokens"] / len(records), "seconds": seconds}


def tokens_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """Forward tokens at which a method's (tokens, reward) curve first reaches `target`, interpolated."""
    points = sorted(points)
    for (t0, r0), (t1, r1) in zip([(0.0, -math.inf)] + points, points):
        if r1 >= target:
            if r0 == -math.inf or r1 == r0:
                return t1
            return t0 + (target - r0) / (r1 - r0) * (t1 - t0)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="sentiment")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--step-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    task = TASKS[args.task]
    records, reward = task.records("test", args.prompts), task.reward()
    rows = []
    for family, label, factory in configurations(reward, args.step_tokens, args.max_new_tokens):
        result = run(model, tok, task, records, reward, factory, args.max_new_tokens, args.seed)
        rows.append({"family": family, "label": label, **result})
        print(f"{label:40s} reward {result['reward']:.3f} +- {result['se']:.3f}  fwd tokens/prompt "
              f"{result['forward_tokens']:7.0f}  reward calls/prompt {result['reward_calls']:5.1f}  "
              f"{result['seconds']:.1f} s", flush=True)
    target = next(r["reward"] for r in rows if r["label"] == "best-of-16")
    print(f"\nforward tokens per prompt to reach best-of-16's reward ({target:.3f}):")
    for family in dict.fromkeys(r["family"] for r in rows):
        points = [(r["forward_tokens"], r["reward"]) for r in rows if r["family"] == family]
        need = tokens_to_reach(points, target)
        print(f"  {family:20s} {'not reached' if need is None else f'{need:.0f}'}")
    load = os.getloadavg()
    print(f"\n{platform.machine()}, {os.cpu_count()} CPU(s), torch threads {args.threads}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {len(records)} prompts x {args.max_new_tokens} tokens")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "target": target}, indent=1))


if __name__ == "__main__":
    main()
