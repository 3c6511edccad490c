"""The `align-decode` command as a real process: killed mid-run, resumed, and on the default model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import read_lines, save_model, write_jsonl

REPO = Path(__file__).resolve().parents[2]
PROMPT_COUNT = 200
# One thread per child: on a shared 2-core machine, torch's thread pool fighting other jobs makes a tiny
# model several times slower, and the test only needs the run to take a few seconds.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(*args) -> list[str]:
    return [sys.executable, "-m", "align_decode.cli", *map(str, args)]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(command(*args), cwd=REPO, env=CHILD_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(*args) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=300)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before writing {count} lines: {process.stderr.read()}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no {count} lines in {timeout} s")


def assert_whole_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "a half-written last line"
    return read_lines(path)  # every line parses


def test_sigterm_and_kill_9_lose_nothing_and_resume_completes(tmp_path):
    policy = save_model(tmp_path / "policy", seed=0)
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"id": f"p{i}", "prompt": f"w{i % 50} w{(7 * i) % 50}"} for i in range(PROMPT_COUNT)])
    out = tmp_path / "out.jsonl"
    args = ["run", "--model", policy, "--prompts", prompts, "--out", out, "--method", "sample",
            "--max-new-tokens", 16, "--batch-size", 1, "--reward", "none", "--temperature", 1.0]

    # SIGTERM: a clean stop that says how to go on.
    first = start(*args)
    wait_for_lines(out, 3, first)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 143, stderr
    assert "rerun with --resume" in stderr and "Traceback" not in stderr
    after_term = assert_whole_lines(out)
    assert 3 <= len(after_term) < PROMPT_COUNT

    # kill -9 in the middle of the resumed run.
    second = start(*args, "--resume")
    wait_for_lines(out, len(after_term) + 3, second)
    second.kill()
    second.wait(timeout=60)
    after_kill = assert_whole_lines(out)
    assert len(after_term) + 3 <= len(after_kill) < PROMPT_COUNT, "the run finished before the kill; make it longer"

    last = finish(*args, "--resume", "--json-summary")
    assert last.returncode == 0, last.stderr
    final = assert_whole_lines(out)
    ids = [line["id"] for line in final]
    assert sorted(ids) == sorted(f"p{i}" for i in range(PROMPT_COUNT))  # every prompt exactly once
    summary = json.loads(last.stdout)
    assert summary["already_done"] == len(after_kill) and summary["prompts"] == PROMPT_COUNT - len(after_kill)


@pytest.mark.slow
def test_default_model_runs_two_prompts(tmp_path):
    from align_decode.cli import cli
    from cli_support import cli_runner

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"id": "hello", "prompt": "Say hello to a new neighbour."},
        {"id": "rain", "messages": [{"role": "user", "content": "Describe a rainy morning."}]},
    ])
    out = tmp_path / "out.jsonl"
    result = cli_runner().invoke(cli, ["run", "--prompts", prompts, "--out", str(out), "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.stderr
    lines = read_lines(out)
    assert [line["id"] for line in lines] == ["hello", "rain"]
    assert all(line["method"] == "genarm" and line["completion"].strip() for line in lines)
    assert "SmolLM2-135M-Instruct" in lines[0]["model"]
    assert lines[0]["hyperparameters"]["arms"][0].startswith("policy prompted: ")
    assert all(set(line["rewards"]) == {"sentiment"} for line in lines)  # the default reward
    # The chat template was applied: the rendered prompt is much longer than the words given.
    assert lines[0]["tokens"]["prompt"] > 20


def test_library_warnings_only_with_verbose_and_own_warnings_always(tmp_path):
    """A library's warnings and log lines are not the user's business: shown with --verbose only.
    align-decode's own warnings (here: a generation_config setting it cannot apply) always show."""
    policy = save_model(tmp_path / "policy", seed=0)
    config = json.loads((Path(policy) / "generation_config.json").read_text())
    (Path(policy) / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    (tmp_path / "noisy_reward.py").write_text(
        "import logging, warnings\n"
        "def score(prompts, completions):\n"
        "    warnings.warn('library noise from a warning', FutureWarning)\n"
        "    logging.getLogger('transformers.modeling_utils').warning('library noise from a log')\n"
        "    return [0.0] * len(completions)\n"
    )
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "w1 w2"}])
    env = {**CHILD_ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}

    def run(out, *extra):
        return subprocess.run(command("run", "--model", policy, "--prompts", prompts, "--out", tmp_path / out,
                                      "--method", "sample", "--max-new-tokens", 3, "--reward", "noisy_reward:score",
                                      *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    plain = run("plain.jsonl")
    assert plain.returncode == 0, plain.stderr
    assert "library noise" not in plain.stderr, plain.stderr
    assert "align-decode: warning: the model's generation_config sets repetition_penalty=1.3" in plain.stderr
    verbose = run("verbose.jsonl", "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "library noise from a warning" in verbose.stderr and "library noise from a log" in verbose.stderr
