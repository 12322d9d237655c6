"""Wrappers around vLLM's V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``).

They open a step plan (``flashhead.handlers.plan``) around the runner calls that compute logits:

- ``execute_model``: one row per scheduled request, in ``input_batch.req_ids`` order; decisions
  from each request's ``SamplingParams``; a seeded request's FlashHead noise comes from
  ``plan.seeded_generator(seed, position)`` (never from vLLM's own generator, see there);
- ``_get_prompt_logprobs_dict``: all dense (prompt logprobs must be exact);
- ``_dummy_sampler_run``: all greedy FlashHead, so warm-up and memory profiling exercise it.

Wrapt wrappers ``(wrapped, instance, args, kwargs)``; they only read runner state.
"""

from __future__ import annotations

from typing import Any

import torch

from flashhead.handlers.plan import (
    RowKind,
    StepPlan,
    classify,
    dense_plan,
    greedy_plan,
    plan_scope,
    seeded_generator,
)


def build_plan(runner: Any, scheduler_output: Any = None) -> StepPlan:
    """Plan for the logits of the runner's current batch (one row per request)."""
    if getattr(runner, "speculative_config", None) is not None:
        return dense_plan("speculative decoding", source="v1")
    batch = runner.input_batch
    requests = runner.requests
    scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    decisions = []
    generators: list[torch.Generator | None] = []
    for index, req_id in enumerate(batch.req_ids):
        params = getattr(requests.get(req_id), "sampling_params", None)
        decision = classify(params)
        decisions.append(decision)
        seed = getattr(params, "seed", None)
        if decision.kind is RowKind.SAMPLED and seed is not None:
            # Position after this step: prompt length + tokens sampled so far, whatever the
            # chunking or batching.
            position = int(batch.num_computed_tokens_cpu[index]) + int(scheduled.get(req_id, 0))
            generators.append(seeded_generator(seed, position))
        else:
            generators.append(None)
    return StepPlan(decisions=decisions, generators=generators, source="v1")


def execute_model(wrapped, instance, args, kwargs):
    scheduler_output = args[0] if args else kwargs.get("scheduler_output")
    with plan_scope(lambda: build_plan(instance, scheduler_output)):
        return wrapped(*args, **kwargs)


def prompt_logprobs(wrapped, instance, args, kwargs):
    with plan_scope(dense_plan("prompt logprobs", source="v1")):
        return wrapped(*args, **kwargs)


def dummy_sampler_run(wrapped, instance, args, kwargs):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    with plan_scope(lambda: greedy_plan(int(hidden_states.shape[0]), source="v1-dummy")):
        return wrapped(*args, **kwargs)
