"""Train an ARM here and show it steers SmolLM2: the `make-preferences` -> `train-arm` -> GenARM path.

1. make-preferences: the sentiment task's train prompts, SmolLM2-135M-Instruct, the VADER sentiment
   reward; K samples per prompt, best paired with worst (the same job `align-decode make-preferences` runs).
2. train-arm: LoRA on SmolLM2 with the GenARM loss, merged into a plain folder (`align-decode train-arm`).
3. On the held-out prompts (subjects no training prompt mentions): plain sampling against GenARM with the
   trained ARM at several weights, and against GenARM with the untrained ARM (the policy itself, i.e.
   sharpening alone) at the middle weight. Mean reward ± SE, win rate against plain sampling, KL.

    python benchmarks/train_demo.py                    # about 15 minutes on a free 2-core CPU
    python benchmarks/train_demo.py --train-prompts 16 --test-prompts 8 --max-new-tokens 16   # a quick look

The equivalent command lines:
    align-decode make-preferences --prompts train.jsonl --reward sentiment --samples 6 --max-new-tokens 24 --out prefs.jsonl
    align-decode train-arm --preferences prefs.jsonl --out arm/ --epochs 2 --batch-size 8 --lr 1e-3 --beta-r 0.1
    align-decode run --method genarm --arm arm/ --beta 2 --prompts test.jsonl --out genarm.jsonl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-prompts", type=int, default=64)
    p.add_argument("--test-prompts", type=int, default=32)
    p.add_argument("--samples", type=int, default=6, help="samples per train prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="GenARM weights 1/beta")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="[default: the align-decode cache]/train-demo")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from align_decode import GenARM, Sample
    from align_decode.decoding import Policy
    from align_decode.models import cache_dir, load_model
    from align_decode.training.preferences import PreferenceSettings
    from align_decode.decoding.guides import ARM
    from align_decode.training.arm import ARMTrainingConfig
    from align_decode.commandline.training_jobs import ARMJob, PreferenceJob, arm_summary, make_preferences, train_arm_job
    from benchmarks.quality.evaluate import complete, summary_row
    from benchmarks.quality.generate import EvalContext, run_token_method
    from benchmarks.quality.tasks import TASKS

    hf_logging.disable_progress_bar()
    task = TASKS["sentiment"]
    work = args.work or cache_dir().parent / "train-demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()

    def note(message):
        print(f"[{time.perf_counter() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    train = task.records("train", args.train_prompts)
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in train))
    settings = PreferenceSettings(samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed)
    prefs = make_preferences(PreferenceJob(str(train_file), str(work / "prefs.jsonl"), "sentiment",
                                           settings=settings, device="cpu"), note=note)
    note(f"make-preferences: {prefs['pairs']} pairs from {prefs['prompts']} prompts, mean margin "
         f"{prefs['mean_margin']:.3f}, {prefs['seconds']:.0f} s")
    config = ARMTrainingConfig(beta_r=0.1, lr=1e-3, epochs=args.epochs, batch_size=8, max_length=128,
                               max_prompt_length=64, eval_fraction=0.15, seed=args.seed)
    metrics = train_arm_job(ARMJob(str(work / "prefs.jsonl"), str(work / "arm"), config=config, device="cpu"))
    note("train-arm: " + arm_summary(metrics).replace("\n", "; "))

    model, tok = load_model()
    policy = Policy(model, tok)
    ctx = EvalContext(policy, task.records("test", args.test_prompts), True, str(task.prompt_file), 2,
                      args.max_new_tokens, 16, args.seed)
    scorers = {"sentiment": task.reward()}
    plain = run_token_method(ctx, Sample(), "sample", "plain sampling", None)
    complete(ctx, plain, scorers)
    rows = [summary_row(plain, "sentiment", None)]
    arm_model, _ = load_model(work / "arm")
    arm = ARM(arm_model, tok, name="trained ARM")
    untrained = ARM(model, tok, name="untrained ARM (the policy)")
    middle = args.weights[len(args.weights) // 2]
    runs = [(arm, "genarm_trained", f"GenARM trained ARM w={w}", w) for w in args.weights]
    runs.append((untrained, "genarm_untrained", f"GenARM untrained ARM w={middle}", middle))
    for guide, family, label, w in runs:
        out = run_token_method(ctx, GenARM(guide, weights=[w]), family, label, w, guide_cost=1.0)
        complete(ctx, out, scorers)
        rows.append(summary_row(out, "sentiment", plain))
        note(f"{label}: reward {rows[-1]['reward']:.3f}")

    print(f"\nheld-out prompts: {len(ctx.records)} x 2 responses, {args.max_new_tokens} new tokens, T = 1")
    print("| method | sentiment ± SE | win vs plain | KL | policy ppl |\n|---|---|---|---|---|")
    for r in rows:
        win = "n/a" if "win_rate" not in r else f"{r['win_rate']:.2f}"
        print(f"| {r['label']} | {r['reward']:.3f} ± {r['reward_se']:.3f} | {win} | {r['kl']:.2f} | "
              f"{r['perplexity']:.2f} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"preferences": prefs, "arm": metrics, "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
