"""FlashHead's own CUDA graphs and the sync-free decode path, on a GPU (skipped without one).

Graph replays must give exactly the eager logits (the same kernels on the same rows), seeded
sampled rows must repeat, and neither the graphed nor the eager decode path may read a device
value on the host (`torch.cuda.set_sync_debug_mode("error")` turns any such read into an
error). Run by scripts/gpu_check.sh with TRITON_INTERPRET=0.
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

from flashhead.handlers.plan import RowDecision, RowKind, StepPlan, seeded_generator
from flashhead.handlers.step_logits import plan_logits
from flashhead.head import FlashHead, LogitTransform
from flashhead.kernels.options import KernelOptions

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA graphs need a GPU (tests/test_cuda_graphs.py runs without)",
)

V, D, C = 4096, 64, 256  # clusters of 16


@pytest.fixture(scope="module")
def heads():
    from tests.helpers.random_heads import random_assets

    weight, assets = random_assets(V, D, C, n_probes=24, specials=[1, 2, 4000], seed=3)
    weight = weight.to("cuda", torch.bfloat16)
    graphed = FlashHead.build(
        weight, assets, backend="triton", options=KernelOptions(dense_min_batch=0)
    )
    eager = FlashHead.build(
        weight,
        assets,
        backend="triton",
        options=KernelOptions(dense_min_batch=0, cuda_graphs=False),
    )
    assert graphed.graphs is not None and eager.graphs is None
    return graphed, eager


def hidden(n, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)).to(
        "cuda", torch.bfloat16
    )


@contextlib.contextmanager
def no_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("n", [1, 3, 8, 20, 32])
def test_replay_equals_eager_greedy(heads, n):
    graphed, eager = heads
    transform = LogitTransform(soft_cap=30.0)
    for seed in range(3):  # the static input is refilled on every call
        h = hidden(n, seed)
        got = graphed.logits(h, transform=transform, dtype=torch.bfloat16)
        want = eager.logits(h, transform=transform, dtype=torch.bfloat16)
        assert got.dtype == torch.bfloat16 and got.shape == (n, V)
        assert torch.equal(got, want)
    assert any(key[0] >= n and not key[1] for key in graphed.graphs.captured)


def test_replay_result_is_not_overwritten_by_the_next_call(heads):
    graphed, _ = heads
    first = graphed.logits(hidden(2, 10))
    kept = first.clone()
    graphed.logits(hidden(2, 11))
    assert torch.equal(first, kept)


def test_seeded_sampled_rows_repeat_and_equal_eager(heads):
    graphed, eager = heads
    temp = torch.tensor([0.0, 0.7, 1.2, 0.9])
    h = hidden(4, 5)

    def gens(seed):  # as the step plan makes them: host generators per (seed, position)
        return [None] + [seeded_generator(seed, 17 + i) for i in range(3)]

    a = graphed.logits(h, temperature=temp, generators=gens(1))
    b = graphed.logits(h, temperature=temp, generators=gens(1))
    c = eager.logits(h, temperature=temp, generators=gens(1))
    d = graphed.logits(h, temperature=temp, generators=gens(2))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(torch.isfinite(a[1:]), torch.isfinite(d[1:]))  # other seeds, other draws
    assert torch.equal(a[0], graphed.logits(h[:1])[0])  # the greedy row ignores the noise
    assert any(key[1] for key in graphed.graphs.captured)


@pytest.mark.parametrize("graphs_on", [True, False], ids=["graphed", "eager"])
def test_decode_path_never_syncs(heads, graphs_on):
    head = heads[0] if graphs_on else heads[1]
    h = hidden(6, 7)
    greedy = StepPlan([RowDecision(RowKind.GREEDY)] * 6)
    sampled = StepPlan(
        [RowDecision(RowKind.SAMPLED, 0.8)] * 3 + [RowDecision(RowKind.GREEDY)] * 3,
        generators=[seeded_generator(9, 1), None, None, None, None, None],
    )
    mixed = StepPlan(
        [RowDecision(RowKind.GREEDY), RowDecision(RowKind.DENSE, reason="logprobs")] * 3
    )

    def stock(x):
        return torch.nn.functional.linear(x, head.weight)

    calls = [(greedy, LogitTransform(scale=0.5)), (sampled, None), (mixed, None)]
    for plan, transform in calls:  # warm up: Triton compiles, graphs are captured (syncs)
        plan_logits(head, h, plan, stock, transform)
    with no_sync():
        for plan, transform in calls:
            out = plan_logits(head, h, plan, stock, transform)
            assert out.shape == (6, V) and out.dtype == torch.bfloat16
    if graphs_on:
        assert not head.graphs.failed and len(head.graphs.captured) >= 3
    torch.cuda.synchronize()


def test_inside_a_callers_capture_the_eager_path_is_captured(heads, caplog):
    graphed, eager = heads
    h = hidden(3, 8)
    graphed.logits(h)  # warm
    static_h = h.clone()
    outer = torch.cuda.CUDAGraph()
    with caplog.at_level(logging.INFO, logger="flashhead"):
        with torch.cuda.graph(outer):
            out = graphed.logits(static_h)
    static_h.copy_(hidden(3, 9))
    outer.replay()
    assert torch.equal(out, eager.logits(static_h))
    assert any("caller's CUDA graph capture" in r.getMessage() for r in caplog.records)


def test_a_failed_capture_launches_eagerly(monkeypatch, caplog):
    from tests.helpers.random_heads import random_assets

    weight, assets = random_assets(V, D, C, n_probes=24, seed=4)
    head = FlashHead.build(
        weight.cuda(), assets, backend="triton", options=KernelOptions(dense_min_batch=0)
    )
    ref = FlashHead.build(
        weight.cuda(),
        assets,
        backend="triton",
        options=KernelOptions(dense_min_batch=0, cuda_graphs=False),
    )

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("capture refused (test)")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Broken)
    h = torch.randn(2, D, device="cuda")
    with caplog.at_level(logging.WARNING, logger="flashhead"):
        assert torch.equal(head.logits(h), ref.logits(h))
        assert torch.equal(head.logits(h), ref.logits(h))
    assert "capture refused" in head.graphs.failed
    assert sum("capturing its CUDA graph" in r.getMessage() for r in caplog.records) == 1


def test_batches_past_the_buckets_launch_eagerly(heads):
    graphed, eager = heads
    h = hidden(40, 12)
    assert torch.equal(graphed.logits(h), eager.logits(h))
    assert any("32 rows" in why or why.startswith("batch>") for why in graphed.graphs.eager_reasons)
