"""The quality benchmark: every method against plain sampling on two tasks, with guides trained here.

    python -m benchmarks.quality.run --full     # the numbers and plots in benchmarks/quality/
    python -m benchmarks.quality.run --smoke    # the same pipeline, reduced (CI; under 10 minutes)

Steps: train an ARM (LoRA on SmolLM2, GenARM loss) and a CD-FUDGE value model per task on the train
prompts; run plain sampling, best-of-N, QAlign, GenARM (trained ARM, untrained ARM, prompted ARM),
tokenwise CD, ARGS and Transfer Q* on held-out prompts; measure reward, win rate, KL, diversity,
perplexity and compute; sweep two ARMs' weights; write results.json, PNG plots and a markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _parse(argv):
    from .scales import scale_parser

    p = scale_parser("python -m benchmarks.quality.run", __doc__.split("\n")[0], "guides")
    p.add_argument("--out", type=Path, help="results folder [default: benchmarks/quality/results/full for --full, "
                   "else a folder beside the trained guides]")
    p.add_argument("--report", type=Path, help="markdown report [default: <out>/RESULTS_quality.md; with --full the "
                   "quality section of benchmarks/RESULTS.md is rewritten too]")
    p.add_argument("--reuse-guides", action="store_true", help="use the guides a previous run left in --work")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from align_decode.decoding import Policy
    from align_decode.models import cache_dir, load_model

    from .scales import SCALES
    from .tasks import TASKS

    scale = SCALES[args.scale]
    work = args.work or cache_dir().parent / "quality-benchmark" / scale.name
    # Only the full run's figures and numbers belong in the repository; smaller runs write beside their guides.
    out = args.out or (HERE / "results" / "full" if scale.name == "full" else work / "results")
    out.mkdir(parents=True, exist_ok=True)
    if args.redraw:
        saved = json.loads((out / "results.json").read_text())
        print(f"rewrote {_publish(saved['run'], saved['rows'], out, args.report)} and its plots", file=sys.stderr)
        return 0
    started = time.perf_counter()

    def note(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per saved or loaded guide would bury the log
    model, tok = load_model()
    policy = Policy(model, tok)
    note(f"scale {scale.name}; policy {model.config._name_or_path}; {args.threads} thread(s)")

    from .guides import TrainedGuides, guide_folders, train_guides

    guides, timings = {}, {}
    for task in TASKS.values():
        tick = time.perf_counter()
        folders = guide_folders(task, work)
        if args.reuse_guides and all((f / "config.json").is_file() for f in folders):
            report = json.loads((work / f"{task.name}_guides.json").read_text())
            guides[task.name] = TrainedGuides(folders[0], folders[1], report, *folders[2:])
            note(f"{task.name}: reusing the guides in {work}")
        else:
            for f in folders:
                shutil.rmtree(f, ignore_errors=True)
            guides[task.name] = train_guides(task, scale, policy, work, args.seed, note)
            (work / f"{task.name}_guides.json").write_text(json.dumps(guides[task.name].report, indent=2))
        timings[f"train {task.name}"] = time.perf_counter() - tick

    from .suite import evaluate_task, multi_objective

    rows, contexts = {}, {}
    for task in TASKS.values():
        tick = time.perf_counter()
        rows[task.name], contexts[task.name] = evaluate_task(task, scale, policy, guides[task.name], args.seed, note)
        timings[f"evaluate {task.name}"] = time.perf_counter() - tick
    tick = time.perf_counter()
    rows["sentiment"] += multi_objective(scale, contexts["sentiment"], TASKS["sentiment"], guides["sentiment"], note)
    timings["multi-objective"] = time.perf_counter() - tick
    total = time.perf_counter() - started

    command = "python -m benchmarks.quality.run " + ("--full" if scale.name == "full" else f"--scale {scale.name}")
    run_info = {
        "scale": scale.__dict__, "command": command, "seconds": round(total, 1),
        "timings": {k: round(v, 1) for k, v in timings.items()}, "threads": args.threads, "seed": args.seed,
        "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), no GPU used",
        "guides": {name: g.report for name, g in guides.items()},
    }
    (out / "results.json").write_text(json.dumps({"run": run_info, "rows": rows}, indent=1))
    report = _publish(run_info, rows, out, args.report)
    note(f"done in {total:.0f} s; results in {out}, report {report}")
    return 0


def _publish(run_info: dict, rows: dict, out: Path, report: Path | None) -> Path:
    """Plots and the markdown report from the metric rows; the full run's report also becomes the quality
    section of benchmarks/RESULTS.md."""
    from . import plots
    from .report import splice_report, write_report
    from .tasks import TASKS

    figures = {}
    for name, task_rows in rows.items():
        figures[f"reward_vs_kl_{name}"] = plots.reward_vs_kl(task_rows, name, out / f"reward_vs_kl_{name}.png")
        figures[f"reward_vs_compute_{name}"] = plots.reward_vs_compute(task_rows, name,
                                                                       out / f"reward_vs_compute_{name}.png")
    figures["over_optimisation"] = plots.over_optimisation(rows["sentiment"], "sentiment", "afinn",
                                                           out / "over_optimisation.png")
    task = TASKS["sentiment"]
    figures["multi_objective"] = plots.multi_objective(rows["sentiment"], task.reward_spec, task.second_objective,
                                                       out / "multi_objective.png")
    names = {k: v.name for k, v in figures.items()}
    path = write_report(report or out / "RESULTS_quality.md", run_info, rows, names, figure_dir=out)
    if run_info["scale"]["name"] == "full" and report is None:
        splice_report(HERE.parent / "RESULTS.md", run_info, rows, names, figure_dir=out)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
