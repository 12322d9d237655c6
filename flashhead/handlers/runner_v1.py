"""Wrappers around vLLM's V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``).

They open a step plan (``flashhead.handlers.plan``) around the runner calls that compute logits:

- ``execute_model``: one row per scheduled request, in ``input_batch.req_ids`` order; decisions
  from each request's ``SamplingParams`` and seeds from ``input_batch.generators``;
- ``_get_prompt_logprobs_dict``: all dense (prompt logprobs must be exact);
- ``_dummy_sampler_run``: all greedy FlashHead, so warm-up and memory profiling exercise it.

Wrapt wrappers ``(wrapped, instance, args, kwargs)``; they only read runner state.
"""

from __future__ import annotations

from typing import Any

from flashhead.handlers.plan import StepPlan, classify, dense_plan, greedy_plan, plan_scope


def build_plan(runner: Any) -> StepPlan:
    """Plan for the logits of the runner's current batch (one row per request)."""
    if getattr(runner, "speculative_config", None) is not None:
        return dense_plan("speculative decoding", source="v1")
    batch = runner.input_batch
    requests = runner.requests
    generators = batch.generators
    decisions = []
    row_generators = []
    for index, req_id in enumerate(batch.req_ids):
        state = requests.get(req_id)
        decisions.append(classify(getattr(state, "sampling_params", None)))
        row_generators.append(generators.get(index))
    return StepPlan(decisions=decisions, generators=row_generators, source="v1")


def execute_model(wrapped, instance, args, kwargs):
    with plan_scope(lambda: build_plan(instance)):
        return wrapped(*args, **kwargs)


def prompt_logprobs(wrapped, instance, args, kwargs):
    with plan_scope(dense_plan("prompt logprobs", source="v1")):
        return wrapped(*args, **kwargs)


def dummy_sampler_run(wrapped, instance, args, kwargs):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    with plan_scope(lambda: greedy_plan(int(hidden_states.shape[0]), source="v1-dummy")):
        return wrapped(*args, **kwargs)
