"""The command line's cheap paths import no torch, transformers, Triton or vLLM (issue 13).

`--help`, `--version`, `<command> --help`, `methods` and argument errors used to take 5-10 s because the
package's top level imported torch. Each case runs `align_decode.cli.main([...])` in a fresh Python
process (this test process has imported torch already, so it cannot tell), which reports the exit status
and which heavy modules ended up in `sys.modules`. One process per case, ~0.1-0.3 s each without torch.

The status and the one-line error are one test, the imports another.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "triton", "vllm")  # must stay out
WATCHED = (*HEAVY, "numpy")  # numpy is reported, not asserted on
MARKER = "@@startup-report@@ "

# Runs in the child: the CLI as the console script calls it, then one marked line of JSON on stdout.
CHILD = f"""
import json, sys
from align_decode.cli import main
try:
    main(sys.argv[1:])
    code = 0
except SystemExit as e:
    code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
sys.stdout.flush()
sys.stderr.flush()
print({MARKER!r} + json.dumps({{"code": code, "modules": [m for m in {WATCHED!r} if m in sys.modules]}}))
"""

# The run command's input checks (prompt file, --method, --reward) happen inside cli._library_output,
# whose first line is `from transformers.utils import logging` (transformers without torch: ~1 s).
@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # "{P}" is an existing prompt file, "{O}" an output path, "{MISSING}" no file
    code: int
    stdout: str = ""  # a fragment of stdout (help, version, listings)
    error: tuple[str, ...] = ()  # fragments of the one error line (argument errors)


CASES = [
    Case("help", ("--help",), 0, stdout="Usage: align-decode"),
    Case("version", ("--version",), 0, stdout="version 0.1"),
    Case("run-help", ("run", "--help"), 0, stdout="its folder is created when"),
    Case("methods", ("methods",), 0, stdout="genarm"),
    Case("make-preferences-help", ("make-preferences", "--help"), 0, stdout="Usage: align-decode make-preferences"),
    Case("train-arm-help", ("train-arm", "--help"), 0, stdout="Usage: align-decode train-arm"),
    Case("train-value-help", ("train-value", "--help"), 0, stdout="Usage: align-decode train-value"),
    Case("serve-help", ("serve", "--help"), 0, stdout="Usage: align-decode serve"),
    Case("bad-top-p", ("run", "--top-p", "2", "--prompts", "{P}", "--out", "{O}"), 2, error=("--top-p", "2")),
    Case("missing-prompts", ("run", "--prompts", "{MISSING}", "--out", "{O}"), 2,
         error=("not found", "missing.jsonl")),
    Case("unknown-reward", ("run", "--prompts", "{P}", "--out", "{O}", "--reward", "no_such_reward"), 2,
         error=("reward", "no_such_reward")),
    Case("unknown-method", ("run", "--prompts", "{P}", "--out", "{O}", "--method", "no_such_method"), 2,
         error=("method", "no_such_method")),
    Case("bad-method-option", ("run", "--prompts", "{P}", "--out", "{O}", "--method", "qalign", "--reward",
                               "length:target=3", "--beta", "-1"), 2,
         error=("--beta must be a finite number > 0, got -1.0",)),
    Case("cross-option-rule", ("run", "--prompts", "{P}", "--out", "{O}", "--method", "qalign", "--reward",
                               "length:target=3", "--steps", "2", "--burn-in", "5"), 2,
         error=("--burn-in 5 leaves no state of the 2 steps",)),
    Case("option-of-another-method", ("run", "--prompts", "{P}", "--out", "{O}", "--method", "sample",
                                      "--steps", "3"), 2, error=("--steps does not apply to method 'sample'",)),
    Case("greedy-best-of-n", ("run", "--prompts", "{P}", "--out", "{O}", "--method", "best_of_n", "--temperature",
                              "0", "--n", "4"), 2, error=("--temperature 0", "best_of_n", "one greedy answer repeated")),
    Case("reward-none-for-qalign", ("run", "--prompts", "{P}", "--out", "{O}", "--method", "qalign", "--reward",
                                    "none"), 2, error=("needs a reward",)),
]


@dataclass
class Report:
    code: int
    modules: list[str]
    stdout: str  # without the report line
    stderr: str


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """probe(case) -> Report, one child process per case for the whole module."""
    root = tmp_path_factory.mktemp("startup")
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "hello"}\n')
    paths = {"{P}": str(prompts), "{O}": str(root / "out.jsonl"), "{MISSING}": str(root / "missing.jsonl")}
    # This checkout first, whatever the installed (editable) copy points at.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    reports: dict[str, Report] = {}

    def run(case: Case) -> Report:
        if case.id not in reports:
            args = [paths.get(a, a) for a in case.args]
            done = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=root, env=env, capture_output=True,
                                  text=True, timeout=120)
            out, _, last = done.stdout.rstrip("\n").rpartition("\n")
            if not (last.startswith(MARKER) and done.returncode == 0):
                out = done.stdout
                pytest.fail(f"the child process failed (status {done.returncode}):\n{done.stdout}\n{done.stderr}")
            data = json.loads(last[len(MARKER):])
            reports[case.id] = Report(data["code"], data["modules"], out, done.stderr)
        return reports[case.id]

    return run


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_exit_status_and_output(case: Case, probe):
    report = probe(case)
    assert report.code == case.code, (report.code, report.stderr)
    if case.code == 0:
        assert case.stdout in report.stdout, report.stdout
        assert report.stderr == "", report.stderr
        return
    # One line on stderr, the error itself, naming what was wrong; no traceback, no usage text.
    lines = report.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align-decode: error: "), report.stderr
    for fragment in case.error:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_no_heavy_imports(case: Case, probe):
    report = probe(case)
    heavy = [m for m in report.modules if m in HEAVY]
    assert heavy == [], f"{' '.join(case.args)} imported {heavy} (also watched: {report.modules})"
