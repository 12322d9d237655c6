"""What the FlashHead logits processor counts for /metrics, and its shadow check and guard,
against the fake vLLM LogitsProcessor of test_handlers_logits."""

from __future__ import annotations

import logging

import pytest
import torch

from flashhead import metrics, settings
from flashhead.handlers import logits as logits_mod
from flashhead.handlers.logits import make_logits_processor
from flashhead.handlers.plan import (
    NO_SAMPLING_PARAMS,
    RowDecision,
    RowKind,
    StepPlan,
    classify,
    dense_plan,
    greedy_plan,
    plan_scope,
)
from tests.test_handlers_logits import C, D, FakeLogitsProcessor, V, model, set_probes  # noqa: F401


@pytest.fixture
def counted(monkeypatch):
    """Fresh counters, and FLASHHEAD_* shadow settings set per test through ``env``."""
    fresh = metrics.RowCounters()
    monkeypatch.setattr(metrics, "_counters", fresh)
    monkeypatch.setattr(metrics, "_flusher", None)
    monkeypatch.setattr(metrics, "_server_dir", None)
    # setenv first: monkeypatch then restores the variable (what setup_server_process writes
    # into os.environ, too) as it was before the test, set or not.
    monkeypatch.setenv(settings.METRICS_DIR_ENV, "unset-by-test")
    monkeypatch.delenv(settings.METRICS_DIR_ENV)
    # This tiny head is cheaper dense at any batch: keep the dispatcher out of the way.
    monkeypatch.setenv("FLASHHEAD_DENSE_MIN_BATCH", "0")
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    settings.reset_for_tests()

    def env(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, v)
        settings.reset_for_tests()

    yield fresh, env
    settings.reset_for_tests()


def rows(counters):
    return {(p, r): n for (_, p, r), n in counters.rows.items()}


def test_rows_are_counted_by_path_and_reason(model, counted):
    model_dir, head = model
    counters, _ = counted
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(3, D)
    plan = StepPlan(
        decisions=[
            RowDecision(RowKind.GREEDY),
            classify(type("P", (), {"logprobs": 2, "temperature": 0.0})()),
            RowDecision(RowKind.DENSE, reason=NO_SAMPLING_PARAMS),
        ]
    )
    with plan_scope(plan):
        proc(head, h)
    with plan_scope(dense_plan("speculative decoding", label="spec_decode")):
        proc(head, h)
    proc(head, h)  # no plan: not a decode step, not counted
    with plan_scope(greedy_plan(3, source="v1-dummy")):
        proc(head, h)  # warm-up: not counted
    assert rows(counters) == {
        ("flashhead", ""): 1,
        ("dense", "logprobs"): 1,
        ("dense", "no_sampling_params"): 1,
        ("dense", "spec_decode"): 3,
    }
    (name,) = {m for m, _, _ in counters.rows}
    assert name == str(model_dir)  # no vLLM config here: the label falls back to the path


def test_dispatcher_rows_are_dense_and_not_shadowed(model, counted, monkeypatch):
    _, head = model
    counters, env = counted
    env(FLASHHEAD_SHADOW="1", FLASHHEAD_DENSE_MIN_BATCH="4")
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    with plan_scope(greedy_plan(4)):
        proc(head, torch.randn(4, D))
    assert rows(counters) == {("dense", "dispatcher"): 4} and counters.shadow == {}


def test_shadow_off_by_default(model, counted):
    _, head = model
    counters, _ = counted
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    with plan_scope(greedy_plan(4)):
        proc(head, torch.randn(4, D))
    assert counters.shadow == {}


def test_a_request_that_asks_is_shadowed_with_the_share_at_zero(model, counted):
    _, head = model
    counters, _ = counted
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    asked = RowDecision(RowKind.GREEDY, shadow=True)
    plan = StepPlan(decisions=[asked, RowDecision(RowKind.GREEDY), asked, asked])
    with plan_scope(plan):
        proc(head, torch.randn(4, D))
    (shadow,) = counters.shadow.values()
    assert shadow[0] == 3  # the three rows of the asking requests, not the fourth


def test_shadow_agrees_when_every_cluster_is_probed(model, counted):
    model_dir, head = model
    counters, env = counted
    env(FLASHHEAD_SHADOW="1")
    set_probes(model_dir, C)
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(32, D, generator=torch.Generator().manual_seed(5))
    with plan_scope(greedy_plan(32)):
        out = proc(head, h)
    (shadow,) = counters.shadow.values()
    assert shadow == [32, 32, 32]
    # The check never changes what is served.
    assert torch.equal(out.argmax(-1), FakeLogitsProcessor.forward(proc, head, h).argmax(-1))


def test_shadow_sees_misses_at_one_probe_and_skips_sampled_rows(model, counted):
    model_dir, head = model
    counters, env = counted
    env(FLASHHEAD_SHADOW="1")
    set_probes(model_dir, 1)
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(64, D, generator=torch.Generator().manual_seed(6))
    plan = StepPlan(
        decisions=[RowDecision(RowKind.GREEDY)] * 48
        + [RowDecision(RowKind.SAMPLED, temperature=1.0)] * 16
    )
    with plan_scope(plan):
        proc(head, h)
    n, agree, contained = next(iter(counters.shadow.values()))
    assert n == 48 and agree < 48 and agree <= contained <= 48


def test_guard_falls_back_and_then_serves_dense(model, counted, caplog):
    model_dir, head = model
    counters, env = counted
    env(FLASHHEAD_SHADOW="1", FLASHHEAD_SHADOW_MIN_AGREEMENT="0.99")
    set_probes(model_dir, 1)
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    gen = torch.Generator().manual_seed(7)
    with caplog.at_level(logging.WARNING, logger="flashhead.test"):
        for _ in range(4):  # 256 rows: past the guard's minimum of 128
            with plan_scope(greedy_plan(64)):
                proc(head, torch.randn(64, D, generator=gen))
    assert set(counters.fallback.values()) == {1}
    assert sum("served dense from now on: shadow guard" in r.message for r in caplog.records) == 1
    h = torch.randn(8, D, generator=gen)
    with plan_scope(greedy_plan(8)):
        out = proc(head, h)
    assert torch.equal(out, FakeLogitsProcessor.forward(proc, head, h))
    # It tripped at 128 shadow rows (the second call): the last two calls and this one are dense.
    assert rows(counters)[("dense", "guard")] == 2 * 64 + 8
    assert rows(counters)[("flashhead", "")] == 2 * 64


def test_a_bad_shadow_value_is_ignored(model, counted):
    """(The plugin logs the problem once per process: tests/test_plugin.py.)"""
    _, head = model
    counters, env = counted
    env(FLASHHEAD_SHADOW="often")
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    with plan_scope(greedy_plan(2)):
        proc(head, torch.randn(2, D))
    assert counters.shadow == {} and rows(counters) == {("flashhead", ""): 2}
