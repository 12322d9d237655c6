"""The batch size from which the server's own dense head beats FlashHead, measured once per head.

The dispatcher's static rule (kernels/dispatch.py) counts rows scored. It was tuned against
``F.linear``, but on a CPU vLLM's dense head is a prepacked oneDNN GEMM that is 2-3x faster at
8 rows (Gemma-3-270M: 43.6 ms against 136.5 ms), so the rule kept batches on FlashHead where
they ran slower than the stock server (0.80-0.92x at 8 requests). A server instead times both
heads once, on the same synthetic hidden states, at the first step that reaches the head, and
hands batches from the first size where dense was within ``FLASH_MARGIN`` of FlashHead to
vLLM's dense path.

Knows nothing of vLLM: the caller passes the two heads as callables, and ``agree`` to make
tensor-parallel ranks take the same decisions (each trial is a collective there, so every rank
must run the same trials in the same order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Trials stop once the timed calls add up to this (an estimate from the agreed timings, so that
# every rank stops at the same trial); beyond it the static rule decides.
# The first decode step that uses the head waits for the trials (a CPU server computes no logits
# while it warms up): 3.7 s for Gemma-3-270M on 1-8 rows, one core, of which the trials of 6
# and 8 rows alone take 1.7 s.
BUDGET_S = 4.0
MAX_ROWS = 64  # no trial of more rows: the [rows, V] outputs stay small
REPEATS = 2
# FlashHead keeps a batch size only where its head was at least 10 % faster: a trial times the
# head alone, and a served FlashHead step also builds the [B, V] logits around the candidates.
# Measured at TP=2 on Gemma-3-270M: 8 rows 182 vs 193 ms in the trials, 0.84x end to end.
FLASH_MARGIN = 1.1
EVICT_BYTES = 128 << 20  # above the last-level cache of a server CPU (32 MiB here)
_evict_buffer: torch.Tensor | None = None


@dataclass(frozen=True)
class Trial:
    rows: int
    flash_s: float
    dense_s: float

    @property
    def dense_wins(self) -> bool:
        return self.dense_s <= self.flash_s * FLASH_MARGIN


@dataclass(frozen=True)
class Crossover:
    """``dense_from``: batches of this many rows or more go to the dense head; None when
    FlashHead was faster at every size tried (up to the trials' limit, or until the budget ran
    out): the static rule then decides beyond the largest size tried."""

    dense_from: int | None
    trials: tuple[Trial, ...]

    def describe(self) -> str:
        times = ", ".join(
            f"{t.rows} rows {t.flash_s * 1e3:.2f} vs {t.dense_s * 1e3:.2f} ms" for t in self.trials
        )
        if self.dense_from is None:
            tried = max((t.rows for t in self.trials), default=0)
            verdict = (
                f"FlashHead was faster at every batch tried (up to {tried} rows); the "
                "rows-scored rule decides beyond"
            )
        else:
            verdict = (
                f"batches of {self.dense_from} rows or more go to the dense head, within "
                f"{FLASH_MARGIN:.1f}x of FlashHead or faster there"
            )
        return f"{verdict} (FlashHead vs dense: {times})"


def _evict_caches() -> None:
    """Overwrite more memory than a server CPU's last-level cache holds. In a decode step the
    model's body runs between two head calls and leaves nothing of the head cached; timed back
    to back, FlashHead's int4 rows (a quarter of a bf16 head) would partly stay in cache and
    look faster than they are (measured: TP=2 Gemma trials kept 8 rows on FlashHead, 170 vs
    175 ms, and the served 8-request decode ran at 0.84x of dense)."""
    global _evict_buffer
    if _evict_buffer is None:
        _evict_buffer = torch.empty(EVICT_BYTES // 4, dtype=torch.float32)
    _evict_buffer.fill_(float(time.perf_counter_ns() % 7))


def time_call(fn: Callable[[torch.Tensor], Any], h: torch.Tensor, repeats: int = REPEATS) -> float:
    """Shortest wall time of ``fn(h)`` over ``repeats`` calls, after one warm-up call, each with
    the CPU caches emptied first. The shortest, not the median: a server's other processes
    share these cores while it starts, and their work only ever adds time (at TP=2 on 2 cores a
    start-up trial once read 112.6 ms for a FlashHead call that takes 49.4)."""
    fn(h)
    times = []
    for _ in range(repeats):
        _evict_caches()
        start = time.perf_counter()
        fn(h)
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_hidden_states(
    hidden_size: int, dtype: torch.dtype, device: torch.device | str
) -> Callable[[int], torch.Tensor]:
    """Rows of unit-variance noise from a fixed seed: the same on every rank, and without the
    tied stage-1 keys that all-zero warm-up states would give (ties take a slower path)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(MAX_ROWS, hidden_size, generator=gen)
    rows = rows.to(device=device, dtype=dtype)
    return lambda n: rows[:n]


def measure_crossover(
    flash: Callable[[torch.Tensor], Any],
    dense: Callable[[torch.Tensor], Any],
    hidden_states: Callable[[int], torch.Tensor],
    limit: int,
    *,
    timer: Callable[[Callable[[torch.Tensor], Any], torch.Tensor], float] | None = None,
    agree: Callable[[float, float], tuple[float, float]] | None = None,
    budget_s: float = BUDGET_S,
) -> Crossover:
    """Double the rows from 1 until dense wins (or ``limit``), then bisect between the last
    FlashHead win and the first dense win. ``agree(flash_s, dense_s)`` returns the timings every
    rank decides on (tensor parallel: their sums). ``timer(fn, h)`` defaults to ``time_call``."""
    timer = timer or time_call
    limit = max(1, min(int(limit), MAX_ROWS))
    trials: list[Trial] = []
    spent = 0.0

    def dense_wins(rows: int) -> bool:
        nonlocal spent
        h = hidden_states(rows)
        flash_s, dense_s = timer(flash, h), timer(dense, h)
        if agree is not None:
            flash_s, dense_s = agree(flash_s, dense_s)
        trials.append(Trial(rows, flash_s, dense_s))
        spent += (flash_s + dense_s) * (REPEATS + 1)
        return trials[-1].dense_wins

    try:
        _, dense_won = _trials(dense_wins, limit, budget_s, lambda: spent)
    finally:
        global _evict_buffer
        _evict_buffer = None  # 128 MiB a server should not keep
    return Crossover(dense_won, tuple(sorted(trials, key=lambda t: t.rows)))


def _trials(
    dense_wins: Callable[[int], bool], limit: int, budget_s: float, spent: Callable[[], float]
) -> tuple[int, int | None]:
    """(largest size FlashHead won, smallest size dense won or None)."""
    flash_won, dense_won = 0, None
    rows = 1
    while True:
        if dense_wins(rows):
            dense_won = rows
            break
        flash_won = rows
        if rows >= limit or spent() >= budget_s:
            break
        rows = min(2 * rows, limit)
    while dense_won is not None and dense_won - flash_won > 1 and spent() < budget_s:
        mid = (flash_won + dense_won) // 2
        if dense_wins(mid):
            dense_won = mid
        else:
            flash_won = mid
    return flash_won, dense_won


def time_head_against_dense(
    head: Any,
    dense: Callable[[torch.Tensor], Any],
    transform: Any,
    like: torch.Tensor,
    max_rows: int | None = None,
) -> Crossover | None:
    """Measure ``head`` (a FlashHead, or a tensor-parallel rank's sharded head) against the
    server's ``dense`` head and set ``head.measured_min_batch``; None where nothing was timed:
    FLASHHEAD_DENSE_MIN_BATCH fixes the choice (``head.options``), the backend is not torch on a
    CPU (a GPU is timed by its own benchmark, not at start-up), or the rule already serves every
    batch dense. Trials stay below the rule's first dense batch (there the head itself would
    hand the rows to its dense GEMM) and at or below ``max_rows``, the most rows a logits call
    of this server can have. Under tensor parallel every rank must call this together:
    the trials are collectives, and the ranks decide on their summed timings."""
    if head.options.dense_min_batch is not None or head.backend != "torch":
        return None
    if like.device.type != "cpu":
        return None
    rule_from = next((n for n in range(1, MAX_ROWS + 1) if head.uses_dense(n, like.device)), None)
    if rule_from == 1:
        return None
    limit = MAX_ROWS if rule_from is None else rule_from - 1
    if max_rows is not None:
        limit = max(1, min(limit, int(max_rows)))
    agree = None
    comm = getattr(head, "comm", None)
    if comm is not None and comm.world_size > 1:

        def agree(flash_s: float, dense_s: float) -> tuple[float, float]:
            both = torch.tensor([flash_s, dense_s], dtype=torch.float32, device=like.device)
            total = comm.all_reduce_sum(both).tolist()
            return float(total[0]), float(total[1])

    def flash(h: torch.Tensor) -> Any:
        return head.logits(h, transform=transform, dtype=h.dtype)

    crossover = measure_crossover(
        flash,
        dense,
        synthetic_hidden_states(int(like.shape[1]), like.dtype, like.device),
        limit,
        agree=agree,
    )
    head.measured_min_batch = crossover.dense_from
    return crossover


__all__ = [
    "BUDGET_S",
    "FLASH_MARGIN",
    "MAX_ROWS",
    "Crossover",
    "Trial",
    "measure_crossover",
    "synthetic_hidden_states",
    "time_call",
    "time_head_against_dense",
]
