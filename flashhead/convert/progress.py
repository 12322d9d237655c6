"""A tiny stderr progress bar with an ETA (no dependency just for this)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, sec = divmod(seconds, 60)
    return f"{minutes}:{sec:02d}"


class Progress:
    """`with Progress("k-means", total=n) as bar: bar.update(k)`.

    Redraws at most every `min_interval` seconds on a terminal; when stderr is not a terminal
    (CI logs) it prints a plain line at most every `log_interval` seconds, so logs stay short.
    """

    def __init__(
        self,
        label: str,
        total: float,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval: float = 0.2,
        log_interval: float = 10.0,
    ) -> None:
        self.label = label
        self.total = max(float(total), 1e-9)
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = min_interval if self._tty else log_interval
        self._start = time.monotonic()
        self._last = -1e9

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.done = self.total
            self._draw(final=True)
        elif self.enabled and self._tty:
            self.stream.write("\n")

    def update(self, amount: float = 1.0, note: str = "") -> None:
        self.done = min(self.total, self.done + amount)
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._draw(note=note)

    def _draw(self, *, final: bool = False, note: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self._start
        frac = self.done / self.total
        if final:
            tail = f"done in {_fmt_seconds(elapsed)}"
        elif frac > 0:
            tail = (
                f"{_fmt_seconds(elapsed)} elapsed, ETA {_fmt_seconds(elapsed * (1 - frac) / frac)}"
            )
        else:
            tail = f"{_fmt_seconds(elapsed)} elapsed"
        if note:
            tail += f" ({note})"
        width = 24
        filled = int(width * frac)
        line = f"{self.label}: [{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% {tail}"
        if self._tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
