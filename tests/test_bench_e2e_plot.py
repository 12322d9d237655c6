"""scripts/bench_e2e.py's plot: drawn with matplotlib where it is installed, a clear note else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_e2e  # noqa: E402

SUMMARY = {"1": {"flashhead": 22.9, "dense": 16.7}, "8": {"flashhead": 89.5, "dense": 110.3}}


def test_without_matplotlib_the_plot_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    note = bench_e2e.write_plot(SUMMARY, tmp_path / "p.png", "t")
    assert "matplotlib is not installed" in note and not (tmp_path / "p.png").exists()


def test_with_matplotlib_a_png_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "p.png"
    assert bench_e2e.write_plot(SUMMARY, out, "t") == f"plot written: {out}"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
