"""convert's progress: a tqdm bar with an ETA on a terminal, one line in logs, quiet on request."""

from __future__ import annotations

import io

import pytest

from flashhead.calibration.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_phase():
    log = io.StringIO()
    with Progress("chat answers", total=10, stream=log) as bar:
        for _ in range(12):  # more than the total: clamped
            bar.update(1, note="batch 3")
    assert log.getvalue() == "chat answers: done in 0:00\n"


def test_a_terminal_gets_a_bar_with_elapsed_time_and_eta():
    term = _Terminal()
    with Progress("clustering", total=4, stream=term) as bar:
        bar.update(2, note="k-means")
    text = term.getvalue()
    assert "clustering: 100.0%" in text and "elapsed, ETA" in text


def test_quiet_writes_nothing_and_a_failure_writes_no_done_line():
    quiet = _Terminal()
    with Progress("x", total=3, stream=quiet, enabled=False) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""
    log = io.StringIO()
    with pytest.raises(RuntimeError), Progress("x", total=3, stream=log):
        raise RuntimeError("boom")
    assert "done" not in log.getvalue()
