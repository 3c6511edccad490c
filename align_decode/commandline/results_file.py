"""The output file: one JSON object per line, each appended and flushed to disk as soon as it is known.

Nothing finished is lost and no half line is left behind when the process dies at any moment: each line
is one os.write of the complete line to a file opened with O_APPEND, followed by fsync. The file (and
its folder) is created with the first line, so a run that fails before any result leaves nothing behind. Ctrl-C and
SIGTERM are held back for the length of that write, so they land between lines. Only a crash inside a
write that the kernel split (or a file written by something else) can leave a partial last line;
--resume drops it with a warning before appending.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Callable

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _plain(value):
    """JSON-ready copy: tensors and arrays to lists, paths to strings, non-finite floats to null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return _plain(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write a {type(value).__name__} to the output file")


def encode_line(record: dict) -> bytes:
    """One complete output line, newline included."""
    return (json.dumps(_plain(record), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


class ResultsFile:
    """An output JSONL file being written.

    Args:
        path: the file; it and its folder are created with the first line.
        resume: continue an existing file, skipping the ids already in it (`done`). Without it an
            existing non-empty file is refused rather than overwritten.
        warn: where warnings go (a dropped partial last line).

    Example:
        >>> with ResultsFile("out.jsonl", resume=True) as out:
        ...     for record in records:
        ...         if str(record["id"]) not in out.done:
        ...             out.append(record)
    """

    def __init__(self, path, resume: bool = False, warn: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.resume = bool(resume)
        self.warn = warn or (lambda message: None)
        self.done: set[str] = set()
        self.first: dict | None = None  # the file's first record, to compare settings on --resume
        self.prompts: dict[str, tuple[int, dict]] = {}  # id -> (line number, {prompt, messages}) of the lines read
        self.written = 0  # lines appended by this process
        self._fd: int | None = None
        self._opened = False

    # ---------------------------------------------------------------------------------------- opening
    def open(self) -> "ResultsFile":
        if self.path.is_dir():
            raise ValueError(f"--out {self.path} is a folder; give a file name")
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not self.resume:
            raise ValueError(
                f"output file {self.path} already exists and is not empty; pass --resume to continue it, "
                "or choose another --out"
            )
        if exists:
            self._scan_existing()
        self._opened = True
        return self

    def _descriptor(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def _scan_existing(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # everything up to the last newline is complete lines
        if end < len(data):
            self.warn(
                f"{self.path}: dropping an unfinished last line ({len(data) - end} bytes) left by an interrupted run"
            )
            os.truncate(self.path, end)
        for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{self.path}:{number}: not a valid result line; is --out the right file?") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{self.path}:{number}: result line without an id; is --out the right file?")
            if self.first is None:
                self.first = record
            self.done.add(str(record["id"]))
            self.prompts[str(record["id"])] = (number, {k: record.get(k) for k in ("prompt", "messages")})

    # ---------------------------------------------------------------------------------------- writing
    def append(self, record: dict) -> None:
        """Write one record as one line and make it durable before returning."""
        if not self._opened:
            raise RuntimeError("ResultsFile.append() before open()")
        data = encode_line(record)
        fd = self._descriptor()
        held = hasattr(signal, "pthread_sigmask")
        if held:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
        try:
            view = memoryview(data)
            while view:  # a regular file takes it in one write; the loop covers a short write
                view = view[os.write(fd, view):]
            os.fsync(fd)
            # Counted before the held signals land, so an interrupted run reports what is really on disk.
            self.done.add(str(record["id"]))
            self.written += 1
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._opened = False

    def __enter__(self) -> "ResultsFile":
        return self if self._opened else self.open()

    def __exit__(self, *exc) -> None:
        self.close()
