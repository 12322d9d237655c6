"""The doctor names an installed package that this checkout's top-level kernels/ hides (`python
-m` from the checkout puts it first on sys.path; transformers >= 5.25 imports PyPI's `kernels`)."""

from __future__ import annotations

import importlib
import sys
from importlib.machinery import PathFinder
from pathlib import Path

from flashhead.doctor import shadowing_checkout

REPO = Path(__file__).resolve().parents[1]
OTHER_ENTRIES = [p for p in sys.path if Path(p or ".").resolve() != REPO]  # as collected


def _site_with_kernels(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("")
    return site


def _path(monkeypatch, *first: Path, others: list[str] = OTHER_ENTRIES) -> None:
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    monkeypatch.delitem(sys.modules, "compat", raising=False)
    monkeypatch.setattr(sys, "path", [str(p) for p in first] + others)
    importlib.invalidate_caches()


def test_the_checkout_first_hides_an_installed_kernels(tmp_path, monkeypatch):
    site = _site_with_kernels(tmp_path)
    _path(monkeypatch, REPO, site)
    found = shadowing_checkout()
    assert len(found) == 1, found
    assert found[0].startswith(f"`import kernels` finds this checkout's {REPO / 'kernels'}/")
    assert str(site / "kernels" / "__init__.py") in found[0]


def test_nothing_to_say_when_nothing_is_hidden(tmp_path, monkeypatch):
    site = _site_with_kernels(tmp_path)
    _path(monkeypatch, site, REPO)  # the installed package first: it is the one imported
    assert shadowing_checkout() == []
    # The checkout first, but no other `kernels` anywhere (a venv may have PyPI's: left out).
    without = [e for e in OTHER_ENTRIES if PathFinder.find_spec("kernels", [e]) is None]
    _path(monkeypatch, REPO, others=without)
    assert shadowing_checkout() == []
