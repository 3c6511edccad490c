"""What a run tells the person at the terminal, all on stderr: notes, warnings and progress.

stdout stays free for --json-summary, so scripts can read it. On a terminal, progress is a bar redrawn in
place; without one (CI, nohup, a log file) it is a plain line every few seconds, so a long run never
looks stuck. Within a batch, the bar and the lines show where the method is (decoding step, candidates
drawn, chain steps), as the strategies report it. Nothing of the kind with --quiet; warnings are shown
even with --quiet (they say something is off).
"""

from __future__ import annotations

import sys
import time

_BAR_WIDTH = 24
LOG_INTERVAL = 5.0  # seconds between plain progress lines without a terminal
_REDRAW = 0.1  # seconds between bar redraws: a redraw per token would cost more than it shows


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Console:
    """Args:
        quiet: no notes and no progress (warnings stay).
        stream: where everything goes (stderr).
        bar: draw a bar in place (default: when the stream is a terminal); otherwise progress is a plain
            line every `log_interval` seconds.
    """

    def __init__(self, quiet: bool = False, stream=None, bar: bool | None = None, log_interval: float = LOG_INTERVAL):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = bool(quiet)
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bar = (not self.quiet) and (isatty() if bar is None else bool(bar))
        self.log_interval = log_interval
        self._bar_shown = False
        self._started: float | None = None
        self._state = (0, 0, 0)  # prompts done, prompts in all, tokens so far
        self._inner: dict[str, tuple[int, int]] = {}  # within the batch: what -> (done, total)
        self._last_draw = 0.0
        self._last_line: float | None = None

    def _print(self, text: str) -> None:
        self.clear_bar()
        self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if not self.quiet:
            self._print(f"align-decode: {message}")

    def warn(self, message: str) -> None:
        self._print(f"align-decode: warning: {message}")

    @property
    def shows_progress(self) -> bool:
        return not self.quiet

    def progress(self, done: int, total: int, tokens: int) -> None:
        """Prompts done of total and tokens generated so far: a batch finished (or the run starts)."""
        self._state = (done, total, tokens)
        self._inner = {}
        self._show(force=True)

    def inner(self, what: str, done: int, total: int) -> None:
        """Within a batch: where the method is, e.g. ("step", 12, 48), ("candidates", 16, 64),
        ("chain step", 3, 16). A new outer unit (candidates, chain step) restarts the steps under it."""
        if what != "step":
            self._inner.pop("step", None)
        self._inner[what] = (done, total)
        self._show(force=done == total)  # the end of a unit is always drawn

    def _text(self) -> str:
        done, total, tokens = self._state
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        elapsed = max(now - self._started, 1e-9)
        eta = "" if done == 0 or total <= done else f" | eta {_clock(elapsed * (total - done) / done)}"
        inner = "".join(f" | {what} {d}/{t}" for what, (d, t) in self._inner.items())
        return f"{done}/{total} prompts | {tokens} tokens | {tokens / elapsed:.1f} tokens/s{eta}{inner}"

    def _show(self, force: bool) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        if self.bar:
            if force or now - self._last_draw >= _REDRAW:
                done, total, _ = self._state
                filled = _BAR_WIDTH if total <= 0 else int(_BAR_WIDTH * done / total)
                self.stream.write(f"\r[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {self._text()}\x1b[K")
                self.stream.flush()
                self._bar_shown = True
                self._last_draw = now
            return
        # No terminal: a plain line at the start, then at most one per log_interval.
        if self._last_line is None or now - self._last_line >= self.log_interval:
            self._last_line = now
            self._print(f"align-decode: progress: {self._text()}")

    def start_clock(self) -> None:
        """Rates count from here (after model loading), not from the console's creation."""
        self._started = time.perf_counter()

    def clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._bar_shown = False
