"""Shared pieces of the command-line tests: tiny saved models, prompt files, running the CLI in process."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from align_decode.cli import cli
from tiny import tiny_llama, tiny_tokenizer


def save_model(path: Path, seed: int, shift: int = 0) -> str:
    tiny_llama(seed=seed).save_pretrained(path)
    tiny_tokenizer(shift=shift).save_pretrained(path)
    return str(path)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def cli_runner() -> CliRunner:
    """A runner that keeps stderr apart from stdout: click < 8.2 needs to be told, 8.2 removed the switch."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def invoke(*args):
    """Run the CLI in process; an exception other than the CLI's own exit is re-raised."""
    result = cli_runner().invoke(cli, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def run_ok(model_dir: str, prompts: str, out, *extra, max_new_tokens: int = 5) -> list[dict]:
    """`align-decode run` that must succeed; the output lines. No reward unless one is given."""
    rewards = [] if "--reward" in extra else ["--reward", "none"]
    result = invoke("run", "--model", model_dir, "--prompts", prompts, "--out", out,
                    "--max-new-tokens", max_new_tokens, "--quiet", *rewards, *extra)
    assert result.exit_code == 0, result.stderr
    return read_lines(out)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    # Notes ("loading ...") may come first; the error itself is the last line, and the only one.
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("align-decode: error: ")]
    assert errors == lines[-1:] and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
