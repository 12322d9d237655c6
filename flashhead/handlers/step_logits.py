"""One logits call of a decode step: FlashHead rows from the head, the rest from vLLM's own path.

Kept apart from the logits processor (and free of vLLM imports) so that ``flashhead bench``
times exactly the code a server runs per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flashhead.handlers.plan import RowKind, StepPlan
from flashhead.kernels.logit_transform import LogitTransform
from flashhead.sampling_noise import to_device


def logit_transform(scale: float, soft_cap: float | None) -> LogitTransform | None:
    """vLLM's soft_cap then scale, as in ``LogitsProcessor.forward``; None when both are off."""
    transform = LogitTransform(float(scale), None if soft_cap is None else float(soft_cap))
    return None if transform.is_identity else transform


def plan_logits(
    head: Any,
    hidden_states: torch.Tensor,
    plan: StepPlan,
    stock: Callable[[torch.Tensor], torch.Tensor | None],
    transform: LogitTransform | None,
) -> torch.Tensor | None:
    """Full-vocabulary logits for one call, in the hidden states' dtype (the stock head's: bf16
    candidate scores round as the dense GEMM rounds them, so vLLM's argmax breaks ties alike):
    FlashHead rows from ``head``, dense rows from ``stock``. Row indices go to the device
    through pinned memory: nothing here waits for the GPU."""
    flash_rows = plan.flash_rows()
    num_rows = int(hidden_states.shape[0])
    dtype = hidden_states.dtype
    if head.uses_dense(len(flash_rows), hidden_states.device):
        # The dispatcher's dense choice runs vLLM's own head: on a CPU a prepacked oneDNN GEMM,
        # faster than the core head's F.linear (and a TP rank holds no whole head).
        return stock(hidden_states)
    all_flash = len(flash_rows) == num_rows
    device = hidden_states.device
    flash_idx = None if all_flash else to_device(torch.tensor(flash_rows), device)
    flash_h = hidden_states if all_flash else hidden_states.index_select(0, flash_idx)
    temperature = None
    if any(plan.decisions[i].kind is RowKind.SAMPLED for i in flash_rows):
        temperature = torch.tensor(
            [plan.decisions[i].temperature for i in flash_rows], dtype=torch.float32
        )
    generators = [plan.generator(i) for i in flash_rows]
    flash_logits = head.logits(
        flash_h,
        temperature=temperature,
        generators=generators if any(g is not None for g in generators) else None,
        transform=transform,
        dtype=dtype,
    )
    if all_flash or flash_logits is None:
        return flash_logits
    dense_idx = to_device(torch.tensor(plan.dense_rows()), device)
    dense_logits = stock(hidden_states.index_select(0, dense_idx))
    out = flash_logits.new_empty((num_rows, flash_logits.shape[1]))
    out.index_copy_(0, flash_idx, flash_logits)
    out.index_copy_(0, dense_idx, dense_logits.to(out.dtype))
    return out
