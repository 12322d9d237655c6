"""Shared fixtures of the e2e suite: models (built once per session) and a log folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e import _models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama and Qwen3 FlashHead models (default probes and all-clusters copies) plus
    their plain base folders."""
    root = tmp_path_factory.mktemp("tiny-models")
    out: dict[str, Path] = {}
    for kind, seed in (("llama", 0), ("qwen3", 1)):
        base = _models.build_tiny_base(kind, root / f"{kind}-base", seed=seed)
        fh = _models.convert(base, root / f"{kind}-fh")
        out[f"{kind}-base"] = base
        out[f"{kind}-fh"] = fh
        out[f"{kind}-fh-all"] = _models.with_probes(fh, root / f"{kind}-fh-all", None)
    return out


@pytest.fixture(scope="session")
def smollm2_fh() -> Path:
    return _models.smollm2_flashhead()


@pytest.fixture(scope="session")
def e2e_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-logs")
