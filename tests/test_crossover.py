"""The measured hand-over to the server's dense head (flashhead/crossover.py): which trials run,
what they decide, and how a head and the step's logits follow the figure. Timings are injected:
no test here depends on how fast this machine is."""

from __future__ import annotations

import pytest
import torch

from flashhead import crossover
from flashhead.crossover import measure_crossover, time_head_against_dense
from flashhead.handlers.plan import greedy_plan
from flashhead.handlers.step_logits import plan_logits
from flashhead.head import FlashHead
from flashhead.kernels import dispatch
from flashhead.kernels.options import KernelOptions
from tests.helpers.random_heads import random_assets

FLASH, DENSE = "flash", "dense"


def costs(flash_ms, dense_ms):
    """A timer that runs the call (as the real one does) and reports a cost from the rows."""
    seen: list[tuple[str, int]] = []

    def timer(fn, h):
        fn(h)
        # crossover.time_head_against_dense names its FlashHead callable "flash" too.
        kind = FLASH if fn.__name__ == FLASH else DENSE
        seen.append((kind, int(h.shape[0])))
        rows = int(h.shape[0])
        return (flash_ms(rows) if kind == FLASH else dense_ms(rows)) / 1e3

    timer.seen = seen
    return timer


def flash(h):
    return h


def dense(h):
    return h


def rows_of(hidden=8):
    return lambda n: torch.zeros(n, hidden)


def test_doubles_until_dense_wins_then_bisects():
    # FlashHead 1 + 2n ms, dense 5 + n ms: dense is as fast from 4 rows on.
    timer = costs(lambda n: 1 + 2 * n, lambda n: 5 + n)
    found = measure_crossover(flash, dense, rows_of(), 64, timer=timer)
    assert found.dense_from == 4
    assert [t.rows for t in found.trials] == [1, 2, 3, 4]
    assert all(t.dense_wins == (t.rows >= 4) for t in found.trials)
    # Each trial times both heads on the same rows.
    assert sorted(timer.seen) == sorted([(k, n) for n in (1, 2, 3, 4) for k in (FLASH, DENSE)])
    assert "batches of 4 rows or more go to the dense head" in found.describe()


def test_flashhead_faster_everywhere_leaves_the_rule_beyond_the_limit():
    found = measure_crossover(
        flash, dense, rows_of(), 12, timer=costs(lambda n: n, lambda n: 10 * n)
    )
    assert found.dense_from is None
    assert [t.rows for t in found.trials] == [1, 2, 4, 8, 12]
    assert "up to 12 rows" in found.describe()


def test_dense_faster_at_one_row():
    found = measure_crossover(flash, dense, rows_of(), 64, timer=costs(lambda n: 9, lambda n: 3))
    assert found.dense_from == 1
    assert [t.rows for t in found.trials] == [1]


def test_the_budget_stops_the_trials():
    # Each trial costs (1 + 2) s x (REPEATS + 1) of the budget.
    timer = costs(lambda n: 1000.0, lambda n: 2000.0)
    found = measure_crossover(flash, dense, rows_of(), 64, timer=timer, budget_s=1.0)
    assert [t.rows for t in found.trials] == [1]
    assert found.dense_from is None


def test_ranks_decide_on_the_agreed_timings():
    # This rank: FlashHead n ms, dense 1.5 n + 1 ms: alone it keeps FlashHead everywhere. The
    # other rank's FlashHead costs 2 n, its dense n: summed, dense is as fast from 2 rows on.
    timer = costs(lambda n: n, lambda n: 1.5 * n + 1)
    alone = measure_crossover(flash, dense, rows_of(), 16, timer=timer)
    assert alone.dense_from is None
    agreed = []

    def agree(flash_s, dense_s):
        rows = round(flash_s * 1e3)
        agreed.append(rows)
        return flash_s + 2 * rows / 1e3, dense_s + rows / 1e3

    together = measure_crossover(flash, dense, rows_of(), 16, timer=timer, agree=agree)
    assert together.dense_from == 2
    assert agreed == [t.rows for t in together.trials] == [1, 2]


@pytest.fixture
def tiny_head():
    weight, assets = random_assets(512, 16, 64, n_probes=4)
    options = KernelOptions(backend="torch", dense_min_batch=None, cpu_compile=False)
    return FlashHead.build(weight, assets, options=options), weight


def fake_timer(dense_from: int):
    """FlashHead 1 ms a row; dense dense_from - 0.5 ms flat: within the margin from dense_from."""
    return costs(lambda n: n, lambda n: dense_from - 0.5)


def test_a_head_hands_batches_from_the_measured_size_to_dense(tiny_head, monkeypatch):
    head, weight = tiny_head
    monkeypatch.setattr(crossover, "time_call", fake_timer(3))
    calls = []

    def stock(h):
        calls.append(int(h.shape[0]))
        return torch.nn.functional.linear(h, weight)

    like = torch.zeros(1, 16)
    found = time_head_against_dense(head, stock, None, like, max_rows=8)
    assert found.dense_from == 3 and head.measured_min_batch == 3
    assert not head.uses_dense(2) and head.uses_dense(3)
    assert "timed within 10 %" in head.dense_reason(5)
    # The step routes a dispatcher-dense batch to the server's own head, not the core's F.linear.
    calls.clear()
    h = torch.randn(4, 16)
    out = plan_logits(head, h, greedy_plan(4), stock, None)
    assert calls == [4]
    torch.testing.assert_close(out, torch.nn.functional.linear(h, weight))
    calls.clear()
    two = plan_logits(head, h[:2], greedy_plan(2), stock, None)
    assert calls == [] and torch.isinf(two).any()  # FlashHead: -inf outside the candidates


def test_an_all_clusters_head_is_timed_at_one_row(monkeypatch):
    # Every cluster probed: the rule serves 2 rows or more dense, so only 1 row is open to trial.
    weight, assets = random_assets(512, 16, 64, n_probes=64)
    head = FlashHead.build(weight, assets, options=KernelOptions(backend="torch"))
    monkeypatch.setattr(crossover, "time_call", fake_timer(100))
    found = time_head_against_dense(head, lambda h: h, None, torch.zeros(1, 16))
    assert [t.rows for t in found.trials] == [1] and found.dense_from is None
    assert not head.uses_dense(1) and head.uses_dense(2)


def test_trials_stay_within_the_server_rows_and_the_rule(tiny_head, monkeypatch):
    head, _ = tiny_head
    monkeypatch.setattr(crossover, "time_call", fake_timer(100))
    found = time_head_against_dense(head, lambda h: h, None, torch.zeros(1, 16), max_rows=6)
    assert found.dense_from is None and max(t.rows for t in found.trials) == 6
    # Without a server limit the rule's first dense batch bounds the trials.
    head.measured_min_batch = None
    rule_from = next(n for n in range(1, 65) if head.uses_dense(n))
    found = time_head_against_dense(head, lambda h: h, None, torch.zeros(1, 16))
    assert max(t.rows for t in found.trials) == min(rule_from - 1, crossover.MAX_ROWS)


def test_nothing_is_timed_where_the_choice_is_fixed(monkeypatch):
    weight, assets = random_assets(512, 16, 64, n_probes=4)
    monkeypatch.setattr(crossover, "time_call", fake_timer(2))
    like = torch.zeros(1, 16)
    pinned = FlashHead.build(weight, assets, options=KernelOptions(dense_min_batch=0))
    assert time_head_against_dense(pinned, lambda h: h, None, like) is None
    assert pinned.measured_min_batch is None
    reference = FlashHead.build(weight, assets, backend="reference")
    assert time_head_against_dense(reference, lambda h: h, None, like) is None


def test_a_fixed_batch_size_comes_before_the_measured_one():
    reason = dispatch.dense_reason("torch", "cpu", 4, 10, 10_000, 0, None, 2)
    assert reason == ""  # FLASHHEAD_DENSE_MIN_BATCH=0: never dense
    assert "=6" in dispatch.dense_reason("torch", "cpu", 6, 10, 10_000, 6, None, 2)
    assert "timed within" in dispatch.dense_reason("torch", "cpu", 2, 10, 10_000, None, None, 2)
    assert dispatch.dense_reason("torch", "cpu", 1, 10, 10_000, None, None, 2) == ""


def test_a_trial_takes_the_shortest_call(monkeypatch):
    # Interference (the server's other processes on the same cores) only ever adds time.
    clock = [0.0]
    durations = iter([9.0, 5.0, 2.0])  # warm-up, then the timed calls
    monkeypatch.setattr(crossover.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(crossover, "_evict_caches", lambda: None)

    def call(h):
        clock[0] += next(durations)

    assert crossover.time_call(call, torch.zeros(1, 4), repeats=2) == 2.0
