"""Shared fixtures of the e2e suite: models (built once per session) and a log folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers.tiny_models import cached_tiny_model

from e2e import _models

TEST_MODEL_CACHE = os.environ.get("FLASHHEAD_TEST_CACHE") or str(
    Path.home() / ".cache" / "flashhead" / "test-models"
)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight Llama and Qwen3 FlashHead models built here (1/16 of the clusters
    probed, and an all-clusters copy), from the shared tiny-model builder's cached bases."""
    root = tmp_path_factory.mktemp("tiny-models")
    out: dict[str, Path] = {}
    for arch, seed in (("llama", 0), ("qwen3", 1)):
        base = cached_tiny_model(
            TEST_MODEL_CACHE, arch=arch, vocab_size=32000, hidden=128, layers=2, seed=seed
        )
        # Clusters of 16 (not the default 4): 1/16 of the clusters must miss on random weights.
        out[f"{arch}-base"] = base  # the plain model (read-only: a shared cache folder)
        converted = _models.convert(base, root / f"{arch}-converted", "--cluster-size", "16")
        # Random weights have no cluster structure, so the converter's automatic n_probes may
        # choose every cluster; the tests want real retrieval: 1/16 of the clusters.
        n_clusters = json.loads((converted / "config.json").read_text())["n_clusters"]
        out[f"{arch}-fh"] = _models.with_probes(converted, root / f"{arch}-fh", n_clusters // 16)
        out[f"{arch}-fh-all"] = _models.with_probes(converted, root / f"{arch}-fh-all", None)
    return out


@pytest.fixture(scope="session")
def tiny_llama_int4_all(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama converted with the default recipe (stage 1 on the head's int4 rows),
    probing every token: exact, like the all-clusters centroid model."""
    root = tmp_path_factory.mktemp("tiny-int4")
    converted = _models.convert(tiny_models["llama-base"], root / "llama-int4-converted")
    return _models.with_probes(converted, root / "llama-fh-int4-all", None)


@pytest.fixture(scope="session")
def smollm2_fh() -> Path:
    return _models.smollm2_flashhead()


@pytest.fixture(scope="session")
def e2e_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-logs")
