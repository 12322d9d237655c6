"""Wrappers around vLLM's Model Runner V2 (``vllm.v1.worker.gpu.model_runner.GPUModelRunner``).

V2 keeps no ``SamplingParams`` after admission: its ``Sampler.add_request(req_idx, params)``
spreads them over per-slot state arrays. ``sampler_add_request`` records FlashHead's decision
per request slot on the sampler; ``sample`` opens the step plan from the batch's slot mapping.

Seeds: as on V1, a seeded request's FlashHead noise comes from a generator keyed by (seed,
position) (``plan.seeded_generator``), so it repeats exactly; unseeded requests use the global
torch RNG.
"""

from __future__ import annotations

from typing import Any

import torch

from flashhead.handlers.plan import (
    RowDecision,
    StepPlan,
    classify,
    dense_plan,
    greedy_plan,
    plan_scope,
    seeded_generator,
)

_TABLE_ATTR = "_flashhead_rows"


def _table(sampler: Any) -> dict[int, tuple[RowDecision, int | None]]:
    table = getattr(sampler, _TABLE_ATTR, None)
    if table is None:
        table = {}
        setattr(sampler, _TABLE_ATTR, table)
    return table


def sampler_add_request(wrapped, instance, args, kwargs):
    result = wrapped(*args, **kwargs)
    req_idx = args[0] if args else kwargs["req_idx"]
    # sampling_params is the last parameter: (req_idx, prompt_len, sampling_params) in vLLM
    # 0.15-0.30, (req_idx, sampling_params) from 0.31.
    params = kwargs["sampling_params"] if "sampling_params" in kwargs else args[-1]
    seed = getattr(params, "seed", None)
    _table(instance)[int(req_idx)] = (classify(params), None if seed is None else int(seed))
    return result


def build_plan(runner: Any, input_batch: Any) -> StepPlan:
    if int(getattr(input_batch, "num_draft_tokens", 0) or 0) > 0:
        return dense_plan("speculative decoding", source="v2", label="spec_decode")
    if getattr(runner, "batch_sharder", None) is not None:
        return dense_plan(
            "batch-sharded sampling (tensor parallel)", source="v2", label="tensor_parallel"
        )
    table = getattr(runner.sampler, _TABLE_ATTR, None) or {}
    num_reqs = int(input_batch.num_reqs)
    slots = input_batch.idx_mapping_np[:num_reqs]
    positions = (
        input_batch.num_computed_tokens_np[:num_reqs] + input_batch.num_scheduled_tokens[:num_reqs]
    )
    decisions = []
    generators: list[torch.Generator | None] = []
    for row in range(num_reqs):
        decision, seed = table.get(
            int(slots[row]), (classify(None), None)
        )  # unknown slot -> dense row
        decisions.append(decision)
        generators.append(None if seed is None else seeded_generator(seed, int(positions[row])))
    return StepPlan(decisions=decisions, generators=generators, source="v2")


def sample(wrapped, instance, args, kwargs):
    input_batch = args[1] if len(args) > 1 else kwargs["input_batch"]
    with plan_scope(lambda: build_plan(instance, input_batch)):
        return wrapped(*args, **kwargs)


def dummy_sampler_run(wrapped, instance, args, kwargs):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    with plan_scope(lambda: greedy_plan(int(hidden_states.shape[0]), source="v2-dummy")):
        return wrapped(*args, **kwargs)
