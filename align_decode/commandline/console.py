"""What a run tells the person at the terminal, all on stderr: notes, warnings and a progress bar.

stdout stays free for --json-summary, so scripts can read it. The bar is drawn only on a terminal and
never with --quiet; warnings are shown even with --quiet (they say something is off).
"""

from __future__ import annotations

import sys
import time

_BAR_WIDTH = 24


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Console:
    def __init__(self, quiet: bool = False, stream=None, bar: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = bool(quiet)
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.bar = (not self.quiet) and (isatty() if bar is None else bool(bar))
        self._bar_shown = False
        self._started: float | None = None
        self._state = (0, 0, 0)  # prompts done, prompts in all, tokens so far
        self._last_draw = 0.0

    def _print(self, text: str) -> None:
        self.clear_bar()
        self.stream.write(text + "\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        if not self.quiet:
            self._print(f"align-decode: {message}")

    def warn(self, message: str) -> None:
        self._print(f"align-decode: warning: {message}")

    def progress(self, done: int, total: int, tokens: int) -> None:
        """Redraw the bar: prompts done of total, tokens generated so far, rate and time left."""
        self._state = (done, total, tokens)
        self._draw("")

    def step(self, step: int, steps: int) -> None:
        """Within a batch: the decoding step reached, so a long batch still shows it is moving."""
        now = time.perf_counter()
        if now - self._last_draw >= 0.1 or step == steps:  # a redraw per token would cost more than it shows
            self._draw(f" | step {step}/{steps}")

    def _draw(self, suffix: str) -> None:
        if not self.bar:
            return
        done, total, tokens = self._state
        now = time.perf_counter()
        if self._started is None:
            self._started = now
        elapsed = max(now - self._started, 1e-9)
        filled = _BAR_WIDTH if total <= 0 else int(_BAR_WIDTH * done / total)
        eta = "" if done == 0 or total <= done else f" | eta {_clock(elapsed * (total - done) / done)}"
        line = (
            f"[{'#' * filled}{'-' * (_BAR_WIDTH - filled)}] {done}/{total} prompts | "
            f"{tokens} tokens | {tokens / elapsed:.1f} tokens/s{eta}{suffix}"
        )
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()
        self._bar_shown = True
        self._last_draw = now

    def start_clock(self) -> None:
        """Rates count from here (after model loading), not from the console's creation."""
        self._started = time.perf_counter()

    def clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._bar_shown = False
