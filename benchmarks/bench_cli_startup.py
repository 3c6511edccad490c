"""Start-up time of the `align-decode` command's cheap paths, against bare `import click` and `import torch`.

Each variant is one fresh process, timed from spawn to exit (wall clock, `time.perf_counter` around
`subprocess.run`):

    import click      python -c "import click"           the floor: an interpreter plus the CLI library
    import torch      python -c "import torch"           what the cheap paths cost when they import torch
    --help            align-decode --help
    --version         align-decode --version
    argument error    align-decode run --top-p 2 --prompts P --out O    (exit status 2, one error line)
    now, before       with --before DIR: python -c "...; from align_decode.cli import main; main(['--help'])"
                      with this checkout, then DIR (an older checkout), first on sys.path: the old
                      checkout has no console script, so both are timed the same way

`align-decode` is the console script beside `sys.executable` (the installed entry point, as a user runs
it), or `python -m align_decode.cli` when there is none. One untimed warm-up round fills the page cache;
then every round runs each variant once in a shuffled order, so drift on a shared machine hits them alike.
The table gives the median and the minimum per variant and the median's ratio to `import click`. Every
run's exit status (and the argument error's one line) is checked, so a broken command cannot look fast.
Processes run in a scratch folder, so `python -c` does not pick up the package from the current directory.

    python benchmarks/bench_cli_startup.py --rounds 15

The row for the package before the lazy imports (issue 13), from a separate worktree; the working tree
is not touched:

    git worktree add /tmp/ad-old 8f317b2
    python benchmarks/bench_cli_startup.py --rounds 15 --before /tmp/ad-old --before-label "commit 8f317b2"
    git worktree remove /tmp/ad-old
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("align-decode")
    return [str(script)] if script.exists() else [sys.executable, "-m", "align_decode.cli"]


def variants(args, scratch: Path) -> dict[str, dict]:
    """name -> {cmd, label, status, check}; check(stdout, stderr) says what is wrong, or ''."""
    prompts = scratch / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hello"}\n')
    cli = cli_command()
    shown = "align-decode" if len(cli) == 1 else "python -m align_decode.cli"

    def usage(out, err):
        return "" if out.startswith("Usage: align-decode") else f"no usage text: {out[:200]!r} {err[-500:]!r}"

    def one_error(out, err):
        lines = err.strip().splitlines()
        ok = len(lines) == 1 and lines[0].startswith("align-decode: error: ") and "--top-p" in lines[0]
        return "" if ok else f"not one error line naming --top-p: {err[-500:]!r}"

    found = {
        "click": dict(cmd=[sys.executable, "-c", "import click"], label='`python -c "import click"`', status=0),
        "torch": dict(cmd=[sys.executable, "-c", "import torch"], label='`python -c "import torch"`', status=0),
        "help": dict(cmd=[*cli, "--help"], label=f"`{shown} --help`", status=0, check=usage),
        "version": dict(cmd=[*cli, "--version"], label=f"`{shown} --version`", status=0,
                        check=lambda out, err: "" if "version" in out else f"no version: {out!r} {err[-500:]!r}"),
        "error": dict(cmd=[*cli, "run", "--top-p", "2", "--prompts", str(prompts), "--out", str(scratch / "o.jsonl")],
                      label=f"`{shown} run --top-p 2 --prompts P --out O` (argument error)", status=2,
                      check=one_error),
    }
    if args.before:
        # The old checkout has no console script: both rows call main(['--help']) from `python -c`.
        for name, where, label in [("now", REPO, "this checkout"), ("before", Path(args.before).resolve(),
                                                                     f"before the change, {args.before_label}")]:
            code = f"import sys; sys.path.insert(0, {str(where)!r}); from align_decode.cli import main; main(['--help'])"
            found[name] = dict(cmd=[sys.executable, "-c", code], status=0, check=usage, where=str(where),
                               label=f"`python -c \"...; main(['--help'])\"`, {label}")
    return found


def check_loaded_from(variant: dict, scratch: Path) -> None:
    """A `python -c` row must load the package from its folder, not the installed one."""
    where = variant["where"]
    code = f"import sys; sys.path.insert(0, {where!r}); import align_decode; print(align_decode.__file__)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=scratch, capture_output=True, text=True).stdout.strip()
    if not loaded.startswith(where + os.sep):
        raise SystemExit(f"{where}: align_decode loads from {loaded!r} instead")


def run_once(variant: dict, scratch: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(variant["cmd"], cwd=scratch, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    problem = "" if proc.returncode == variant["status"] else f"exit status {proc.returncode}: {proc.stderr[-2000:]}"
    problem = problem or variant.get("check", lambda out, err: "")(proc.stdout, proc.stderr)
    if problem:
        raise SystemExit(f"{shlex.join(variant['cmd'])}: {problem}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds; each runs every variant once")
    ap.add_argument("--before", metavar="DIR",
                    help="an older checkout of the repository: adds its `--help` as a row, with this checkout's "
                    "timed the same way")
    ap.add_argument("--before-label", default="older checkout", help="how the table names --before's commit")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    ap.add_argument("--out", default="benchmarks/out/bench_cli_startup.json", help="raw results (JSON)")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-cli-startup-") as tmp:
        scratch = Path(tmp)
        table = variants(args, scratch)
        for name in ("now", "before"):
            if name in table:
                check_loaded_from(table[name], scratch)
        load_start = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
        for name in table:  # warm-up, untimed
            run_once(table[name], scratch)
        times: dict[str, list[float]] = {name: [] for name in table}
        for r in range(args.rounds):
            order = list(table)
            rng.shuffle(order)
            for name in order:
                times[name].append(run_once(table[name], scratch))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.3f}" for n in table),
                  file=sys.stderr, flush=True)
        load_end = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    floor = statistics.median(times["click"])
    rerun = ["python", "benchmarks/bench_cli_startup.py", "--rounds", str(args.rounds)]
    if args.before:
        rerun += ["--before", args.before, "--before-label", args.before_label]
    print(f"\n    {shlex.join(rerun)}\n")
    print(f"{args.rounds} rounds after one warm-up, each variant once per round in a shuffled order; wall time "
          f"from spawn to exit. Python {platform.python_version()}, click {version('click')}, "
          f"torch {version('torch')}, transformers {version('transformers')}, {os.cpu_count()} CPUs; "
          f"load average {' '.join(load_start)} at the start, {' '.join(load_end)} at the end.\n")
    print("| command | median s | min s | median vs `import click` |")
    print("|---|---|---|---|")
    for name, variant in table.items():
        t = times[name]
        print(f"| {variant['label']} | {statistics.median(t):.3f} | {min(t):.3f} | {statistics.median(t) / floor:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "load_start": load_start, "load_end": load_end,
                               "commands": {n: v["cmd"] for n, v in table.items()}, "seconds": times}, indent=1))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
