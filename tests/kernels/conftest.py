"""Kernel tests run the Triton kernels in the interpreter on CPU unless a GPU run turns it off.

TRITON_INTERPRET is read when `@triton.jit` decorates a kernel, so this conftest imports
`flashhead.kernels.triton_ops` with it set (default 1; `TRITON_INTERPRET=0` on a GPU machine
runs the same tests on CUDA tensors). The variables are set for these tests only (an autouse
fixture) and restored right after the import, so they never leak into other tests or into the
vLLM servers that end-to-end tests start.
"""

from __future__ import annotations

import os

import pytest
import torch

KERNEL_TEST_ENV = {
    "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
    # The CPU torch backend compiles its gather-dot per shape (~15 s each); these tests use many
    # small shapes, so they run the gather + GEMV path, and one slow test covers the compiled one.
    "FLASHHEAD_CPU_COMPILE": os.environ.get("FLASHHEAD_CPU_COMPILE", "0"),
    # Tiny test heads would go dense by the dispatcher's rows rule; tests of FlashHead semantics
    # need FlashHead (tests of the rule set the variable themselves).
    "FLASHHEAD_DENSE_MIN_BATCH": os.environ.get("FLASHHEAD_DENSE_MIN_BATCH", "0"),
}
INTERPRET = KERNEL_TEST_ENV["TRITON_INTERPRET"] not in ("", "0")

_saved = {key: os.environ.get(key) for key in KERNEL_TEST_ENV}
os.environ.update(KERNEL_TEST_ENV)
try:
    import flashhead.kernels.triton_ops  # noqa: F401  (decorates the kernels in this mode)
finally:
    for key, value in _saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def kernel_test_env(monkeypatch):
    for key, value in KERNEL_TEST_ENV.items():
        monkeypatch.setenv(key, value)


def kernel_device() -> torch.device:
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 but no CUDA device: the Triton kernels cannot run here")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return kernel_device()


def random_assets(
    vocab: int,
    hidden: int,
    n_clusters: int,
    *,
    n_probes: int,
    specials: list[int] | None = None,
    unequal: bool = False,
    seed: int = 0,
):
    """(weight [V, d] float32, FlashHeadAssets) with clustered structure: tokens are noisy copies
    of their cluster's centroid, so the centroid ranking predicts the token ranking."""
    from pathlib import Path

    from flashhead.assets import FlashHeadAssets

    gen = torch.Generator().manual_seed(seed)
    assign = torch.randperm(vocab, generator=gen) % n_clusters
    if unequal:
        assign[assign == 0] = torch.where(torch.arange(int((assign == 0).sum())) % 2 == 0, 0, 1)
    centers = torch.randn(n_clusters, hidden, generator=gen)
    weight = centers[assign] + 0.5 * torch.randn(vocab, hidden, generator=gen)
    centroids = torch.stack([weight[assign == i].mean(0) for i in range(n_clusters)])
    assets = FlashHeadAssets(
        model_dir=Path("."), cache_dir=Path("."), centroids=centroids, assignments=assign,
        n_probes=n_probes, special_token_ids=sorted(specials or []),
    )  # fmt: skip
    return weight, assets


@pytest.fixture(scope="session")
def make_assets():
    return random_assets
