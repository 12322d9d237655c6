"""flashhead.cuda_graphs without a GPU: buckets, and every road back to eager launches (each
logged once). The replays themselves run in tests/kernels/test_kernels_cuda_graphs.py on CUDA."""

from __future__ import annotations

import logging

import pytest
import torch

from flashhead.cuda_graphs import BUCKETS, HeadGraphs, bucket_for
from flashhead.head import FlashHead
from flashhead.kernels.options import KernelOptions
from tests.helpers.random_heads import random_assets


def test_buckets_cover_vllms_small_capture_sizes():
    assert BUCKETS == (1, 2, 4, 8, 16, 24, 32)
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 17, 25, 32)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        24,
        32,
        32,
    ]
    assert bucket_for(33) is None and bucket_for(3, (4, 2)) == 4


def graphs(body_calls: list) -> HeadGraphs:
    def body(h, inv_t, noise, out, transform):
        body_calls.append(h.shape[0])

    return HeadGraphs(
        body,
        hidden_size=8,
        n_clusters=4,
        vocab_size=16,
        device=torch.device("cpu"),
    )


def test_a_failed_capture_turns_graphs_off_and_says_so_once(caplog):
    calls: list = []
    g = graphs(calls)
    h = torch.zeros(3, 8)
    with caplog.at_level(logging.INFO, logger="flashhead"):
        assert g.logits(h, None, None, None, torch.float32) is None  # no CUDA here: capture fails
        assert g.logits(h, None, None, None, torch.float32) is None
    assert g.failed and not g.captured
    warnings = [r for r in caplog.records if "capturing its CUDA graph" in r.getMessage()]
    assert len(warnings) == 1 and "launches eagerly from now on" in warnings[0].getMessage()
    assert g.describe()["failed"] == g.failed


def test_batches_past_the_largest_bucket_launch_eagerly_logged_once(caplog):
    g = graphs([])
    with caplog.at_level(logging.INFO, logger="flashhead"):
        for _ in range(3):
            assert g.logits(torch.zeros(33, 8), None, None, None, torch.float32) is None
    lines = [r.getMessage() for r in caplog.records if "launches eagerly" in r.getMessage()]
    assert lines == [
        "FlashHead: a batch of more than 32 rows (the largest graph bucket) launches eagerly "
        "(no FlashHead CUDA graph)"
    ]
    assert not g.failed  # a large batch is no failure: smaller ones still replay


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_no_graphs_off_the_gpu(backend):
    weight, assets = random_assets(64, 16, 8, n_probes=2)
    head = FlashHead.build(weight, assets, backend=backend)
    assert head.graphs is None and head.describe()["cuda_graphs"] is None


def test_setting_turns_graphs_off(monkeypatch):
    from flashhead import settings

    monkeypatch.setenv("FLASHHEAD_CUDA_GRAPHS", "0")
    settings.reset_for_tests()
    try:
        assert settings.settings().kernel_options().cuda_graphs is False
    finally:
        settings.reset_for_tests()
    assert KernelOptions().cuda_graphs is True
