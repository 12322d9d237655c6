"""Wrappers around vLLM's V1 model runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``).

They open a step plan (``flashhead.handlers.plan``) around the runner calls that compute logits:

- ``execute_model``: one row per scheduled request, in ``input_batch.req_ids`` order; decisions
  from each request's ``SamplingParams``; a seeded request's FlashHead noise comes from
  ``plan.seeded_generator(seed, position)`` (never from vLLM's own generator, see there); under
  speculative decoding the whole step is dense;
- ``execute_model_with_drafts``: the same, and under speculative decoding each request has one
  row per draft token plus one (the verification rows, in request order: vLLM's
  ``_calc_spec_decode_metadata``), each with the request's decision and a generator keyed by
  the position that row predicts. vLLM's rejection sampler then runs on FlashHead's logits
  (docs/DESIGN.md, "Speculative decoding"). Drafters compute their logits in ``sample_tokens``,
  outside this scope: ``flashhead.handlers.drafter`` opens their plan;
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

SPEC_DECODE_DENSE = (
    "speculative decoding: this release's patchset does not serve verification rows "
    "(support.spec_decode: dense)"
)


def build_plan(runner: Any, scheduler_output: Any = None, *, drafts: bool = False) -> StepPlan:
    """Plan for the logits of the runner's current batch: one row per request, or with
    ``drafts`` under speculative decoding, one per draft token plus one."""
    speculative = getattr(runner, "speculative_config", None) is not None
    if speculative and not drafts:
        return dense_plan(SPEC_DECODE_DENSE, source="v1", label="spec_decode")
    batch = runner.input_batch
    requests = runner.requests
    scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    draft_ids = {}
    if speculative:
        draft_ids = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
    decisions = []
    generators: list[torch.Generator | None] = []
    for index, req_id in enumerate(batch.req_ids):
        params = getattr(requests.get(req_id), "sampling_params", None)
        decision = classify(params)
        num_drafts = len(draft_ids.get(req_id, ()))
        # Position after this step: prompt length + tokens sampled so far, whatever the
        # chunking or batching. Verification row j predicts the token after draft j - 1.
        last = int(batch.num_computed_tokens_cpu[index]) + int(scheduled.get(req_id, 0))
        seed = getattr(params, "seed", None)
        for row in range(num_drafts + 1):
            decisions.append(decision)
            if decision.kind is RowKind.SAMPLED and seed is not None:
                generators.append(seeded_generator(seed, last - num_drafts + row))
            else:
                generators.append(None)
    source = "v1-spec" if draft_ids else "v1"
    return StepPlan(decisions=decisions, generators=generators, source=source)


def execute_model(wrapped, instance, args, kwargs):
    scheduler_output = args[0] if args else kwargs.get("scheduler_output")
    with plan_scope(lambda: build_plan(instance, scheduler_output)):
        return wrapped(*args, **kwargs)


def execute_model_with_drafts(wrapped, instance, args, kwargs):
    scheduler_output = args[0] if args else kwargs.get("scheduler_output")
    with plan_scope(lambda: build_plan(instance, scheduler_output, drafts=True)):
        return wrapped(*args, **kwargs)


def prompt_logprobs(wrapped, instance, args, kwargs):
    with plan_scope(dense_plan("prompt logprobs", source="v1", label="prompt_logprobs")):
        return wrapped(*args, **kwargs)


def dummy_sampler_run(wrapped, instance, args, kwargs):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    with plan_scope(lambda: greedy_plan(int(hidden_states.shape[0]), source="v1-dummy")):
        return wrapped(*args, **kwargs)
