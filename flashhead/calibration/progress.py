"""Progress of convert's long phases on stderr: a tqdm bar with an ETA on a terminal; where
stderr is not a terminal (CI logs, pipes) no bar, one line when the phase is done."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    minutes, sec = divmod(seconds, 60)
    return f"{minutes}:{sec:02d}"


class Progress:
    """`with Progress("k-means", total=n) as bar: bar.update(k, note="...")`."""

    def __init__(
        self, label: str, total: float, *, stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._line = enabled and not tty
        self._start = time.monotonic()
        self._bar = tqdm(
            total=max(float(total), 1e-9),
            desc=label,
            file=self.stream,
            disable=not (enabled and tty),
            mininterval=0.2,
            bar_format="{desc}: {percentage:5.1f}%|{bar:24}| {elapsed} elapsed, ETA {remaining}"
            "{postfix}",
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._bar.update(self._bar.total - self._bar.n)
        self._bar.close()
        if exc_type is None and self._line:
            elapsed = _fmt_seconds(time.monotonic() - self._start)
            self.stream.write(f"{self.label}: done in {elapsed}\n")
            self.stream.flush()

    def update(self, amount: float = 1.0, note: str = "") -> None:
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        self._bar.update(min(amount, self._bar.total - self._bar.n))
