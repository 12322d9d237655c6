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

from tests.helpers.random_heads import random_assets

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


@pytest.fixture(scope="session")
def make_assets():
    return random_assets
