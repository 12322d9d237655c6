"""The shadow check and its guard: FlashHead's greedy rows compared with the dense head on the
server's own traffic.

With ``FLASHHEAD_SHADOW=f`` a share ``f`` of FlashHead's greedy rows is also scored by the dense
head in the same step, and so is every greedy row of a request that asks for it
(``"vllm_xargs": {"flashhead_shadow": 1}``, `plan.SHADOW_REQUEST_ARG`), whatever ``f``. The
dense result is compared, never served: whether FlashHead's top-1 equals the dense top-1, and
whether the dense top-1 is among FlashHead's top 5. Rows are drawn
from a generator of the check's own, so no request's sampling changes. Sampled rows are not
shadowed: their probes are themselves a random draw, so their top-1 is not FlashHead's answer.

With ``FLASHHEAD_SHADOW_MIN_AGREEMENT=a`` the guard watches the top-1 agreement of the last
``GUARD_WINDOW`` shadow rows (from ``GUARD_MIN_ROWS`` rows on); below ``a`` the model is served
dense from then on (the guard never switches back: its evidence was FlashHead's misses).
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flashhead import metrics
from flashhead.handlers.plan import RowKind, StepPlan
from flashhead.handlers.tensor_parallel import counts_rows
from flashhead.settings import GUARD_MIN_ROWS, GUARD_WINDOW


class ShadowCheck:
    """Per model: which rows to shadow, and the guard's window."""

    def __init__(
        self,
        share: float,
        min_agreement: float | None = None,
        *,
        window: int = GUARD_WINDOW,
        min_rows: int = GUARD_MIN_ROWS,
        seed: int | None = None,
    ) -> None:
        self.share = float(share)
        self.min_agreement = min_agreement
        self.min_rows = min(int(min_rows), int(window))
        self._recent: collections.deque[bool] = collections.deque(maxlen=int(window))
        self._rng = random.Random(seed)
        self.tripped = ""  # why the guard fell back; empty while FlashHead serves

    def pick(self, rows: Sequence[int]) -> list[int]:
        """The subset of ``rows`` to shadow this call."""
        if self.share <= 0.0:
            return []
        if self.share >= 1.0:
            return list(rows)
        return [r for r in rows if self._rng.random() < self.share]

    def compare(
        self, flash_logits: torch.Tensor, dense_logits: torch.Tensor
    ) -> tuple[int, int, int]:
        """(rows, top-1 agreements, top-5 containments) of [n, V] logits of the same rows, in
        the dtype vLLM samples from (ties break to the smallest id on both)."""
        n = int(flash_logits.shape[0])
        if n == 0:
            return 0, 0, 0
        dense_top1 = dense_logits.argmax(dim=-1)
        agree = flash_logits.argmax(dim=-1) == dense_top1
        k = min(5, int(flash_logits.shape[-1]))
        top5 = flash_logits.topk(k, dim=-1).indices
        contained = (top5 == dense_top1.unsqueeze(-1)).any(dim=-1)
        self._recent.extend(bool(a) for a in agree.tolist())
        return n, int(agree.sum()), int(contained.sum())

    def check_guard(self) -> str:
        """Trip the guard if the window's agreement is below the minimum; the reason, or ""."""
        if self.tripped or self.min_agreement is None or len(self._recent) < self.min_rows:
            return self.tripped
        agreement = sum(self._recent) / len(self._recent)
        if agreement < self.min_agreement:
            self.tripped = (
                f"shadow guard: top-1 agreement {agreement:.4f} over the last "
                f"{len(self._recent)} shadow rows is below FLASHHEAD_SHADOW_MIN_AGREEMENT="
                f"{self.min_agreement:g}"
            )
        return self.tripped


def count_and_shadow(
    state: Any,
    head: Any,
    plan: StepPlan,
    hidden_states: torch.Tensor,
    logits: torch.Tensor,
    stock: Callable[[torch.Tensor], torch.Tensor | None],
    log_once: Callable[..., None],
) -> None:
    """For the logits processor (``state`` is its per-model state, ``log_once`` its logger):
    count a served call's rows by path; shadow-check a share of its greedy FlashHead rows
    (never changing ``logits``); trip the guard when their agreement fell too low."""
    flash_rows = plan.flash_rows()
    by_dispatcher = head.uses_dense(len(flash_rows), hidden_states.device)
    if by_dispatcher:
        state.count("dense", "dispatcher", len(flash_rows))
    else:
        state.count("flashhead", "", len(flash_rows))
    for i in plan.dense_rows():
        state.count("dense", plan.decisions[i].label, 1)
    shadow = state.shadow
    if shadow is None or by_dispatcher:
        return
    greedy = [i for i in flash_rows if plan.decisions[i].kind is RowKind.GREEDY]
    picked = set(shadow.pick(greedy))
    rows = [i for i in greedy if i in picked or plan.decisions[i].shadow]
    if not rows:
        return
    try:
        dense = stock(hidden_states[rows])
        n, agree, contained = shadow.compare(logits[rows], dense.to(logits.dtype))
    except Exception as exc:  # the check must never cost an answer
        log_once("shadow-error", logging.ERROR, "FlashHead: shadow check failed: %r", exc)
        return
    if counts_rows():  # tensor parallel: every rank shadows the same rows; one counts them
        metrics.counters().count_shadow(state.model_name, n, agree, contained)
    reason = shadow.check_guard()
    if reason:
        metrics.counters().set_fallback(state.model_name, True)
        log_once(
            f"guard:{id(state)}",
            logging.WARNING,
            "FlashHead: %s is served dense from now on: %s",
            state.model,
            reason,
        )
