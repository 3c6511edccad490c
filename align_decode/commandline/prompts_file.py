"""Prompt files: JSON Lines with an id and a prompt or chat messages, or plain text with one prompt per line.

JSONL, one object per line:
    {"id": "q1", "prompt": "Write a haiku about tea."}
    {"id": 7, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
`id` (a string or an integer) is optional and defaults to the line number; any other fields are kept
and copied to the output line under "meta". Plain text: every non-blank line is a prompt, its id the
line number. Blank lines are skipped in both formats.

A record's `index` is its position among the file's non-blank lines, bad lines included, so that
`--shard` and `--skip-bad-lines` never move a prompt from one shard to another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FORMATS = ("auto", "jsonl", "text")
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_TEXT_SUFFIXES = {".txt", ".text"}
_RESERVED = {"id", "prompt", "messages"}


class PromptFileError(ValueError):
    """A problem with one line of a prompt file (or with the file as a whole when line is None)."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


@dataclass
class PromptRecord:
    id: str | int
    line: int  # 1-based line number in the file
    index: int  # position among the file's non-blank lines
    prompt: str | None = None
    messages: list[dict] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The id as compared for duplicates and --resume: 7 and "7" are the same prompt."""
        return str(self.id)

    @property
    def text(self) -> str:
        """The prompt as plain text (what sequence rewards read): the string, or the last user turn."""
        if self.prompt is not None:
            return self.prompt
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else self.messages[-1]["content"]


def _check_id(value, path, line) -> str | int:
    # bool is an int subclass, and a float id would not survive a JSON round trip as the same key.
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise PromptFileError(path, line, f"id must be a string or an integer, got {json.dumps(value)}")
    if isinstance(value, str) and not value.strip():
        raise PromptFileError(path, line, "id must not be empty")
    return value


def _check_messages(value, path, line) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise PromptFileError(path, line, "messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptFileError(path, line, f"messages[{i}] must be an object with string role and content")
    return value


def _parse_json_line(raw: str, path, line: int, index: int) -> PromptRecord:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PromptFileError(path, line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise PromptFileError(path, line, f"expected a JSON object with a prompt or messages, got {type(obj).__name__}")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise PromptFileError(path, line, "give exactly one of 'prompt' (a string) or 'messages' (chat turns)")
    record = PromptRecord(
        id=_check_id(obj["id"], path, line) if "id" in obj else line,
        line=line,
        index=index,
        meta={k: v for k, v in obj.items() if k not in _RESERVED},
    )
    if has_prompt:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise PromptFileError(path, line, "prompt must be a non-empty string")
        record.prompt = obj["prompt"]
    else:
        record.messages = _check_messages(obj["messages"], path, line)
    return record


def _detect_format(path: Path, lines: list[str]) -> str:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _TEXT_SUFFIXES:
        return "text"
    first = next((ln for ln in lines if ln.strip()), "")
    return "jsonl" if first.lstrip().startswith("{") else "text"


def read_prompts(
    path,
    fmt: str = "auto",
    skip_bad_lines: bool = False,
    warn: Callable[[str], None] | None = None,
) -> list[PromptRecord]:
    """Every prompt of the file in order. A bad line raises PromptFileError naming the file and line,
    or with skip_bad_lines is reported through `warn` and left out. Duplicate ids are always an error."""
    if fmt not in FORMATS:
        raise ValueError(f"prompt format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PromptFileError(path, None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if fmt == "auto":
        fmt = _detect_format(path, lines)

    records: list[PromptRecord] = []
    first_line: dict[str, int] = {}
    nonblank = [(number, raw) for number, raw in enumerate(lines, start=1) if raw.strip()]
    for index, (number, raw) in enumerate(nonblank):
        try:
            if fmt == "jsonl":
                record = _parse_json_line(raw, path, number, index)
            else:
                record = PromptRecord(id=number, line=number, index=index, prompt=raw)
        except PromptFileError as e:
            if not skip_bad_lines:
                raise
            if warn is not None:
                warn(f"skipping {e}")
            continue
        if record.key in first_line:
            raise PromptFileError(
                path, number, f"duplicate id {json.dumps(record.id)} (first on line {first_line[record.key]})"
            )
        first_line[record.key] = number
        records.append(record)
    if not records:
        raise PromptFileError(path, None, "no prompts in the file")
    return records


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n; None means the whole file (0/1)."""
    if text is None:
        return 0, 1
    parts = str(text).split("/")
    try:
        if len(parts) != 2:
            raise ValueError
        i, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard i/n needs n >= 1 and 0 <= i < n, got {text!r}")
    return i, n


def shard_records(records: list[PromptRecord], i: int, n: int) -> list[PromptRecord]:
    """The records of shard i of n: every n-th line, so shards stay balanced whatever the file's order."""
    return [r for r in records if r.index % n == i]
