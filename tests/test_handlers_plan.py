"""Step plan: per-row decisions from SamplingParams, scope semantics, V1/V2 plan builders."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from flashhead.handlers import runner_v1, runner_v2
from flashhead.handlers.plan import (
    RowKind,
    classify,
    current_plan,
    dense_plan,
    greedy_plan,
    plan_for_rows,
    plan_scope,
    seeded_generator,
)


def params(**kw):
    """A stand-in for vllm.SamplingParams with its defaults."""
    base = dict(
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        seed=None,
        logprobs=None,
        logit_bias=None,
        allowed_token_ids=None,
        bad_words=None,
        structured_outputs=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


# The per-feature choice table of docs/DESIGN.md, one row per case.
@pytest.mark.parametrize(
    "kw, kind",
    [
        (dict(temperature=0.0), RowKind.GREEDY),
        (dict(temperature=1e-6), RowKind.GREEDY),
        (dict(temperature=0.0, presence_penalty=0.5, repetition_penalty=1.3), RowKind.GREEDY),
        (dict(temperature=0.8), RowKind.SAMPLED),
        (dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05), RowKind.SAMPLED),
        (dict(temperature=0.7, seed=123), RowKind.SAMPLED),
        (dict(temperature=0.7, frequency_penalty=0.5), RowKind.SAMPLED),
        (dict(temperature=0.0, logprobs=0), RowKind.DENSE),
        (dict(temperature=0.7, logprobs=5), RowKind.DENSE),
        (dict(temperature=0.0, logit_bias={5: 10.0}), RowKind.DENSE),
        (dict(temperature=0.0, allowed_token_ids=[1, 2]), RowKind.DENSE),
        (dict(temperature=0.0, bad_words=["x"]), RowKind.DENSE),
        (dict(temperature=0.0, structured_outputs=object()), RowKind.DENSE),
    ],
)
def test_classify_choice_table(kw, kind):
    decision = classify(params(**kw))
    assert decision.kind is kind
    if kind is RowKind.SAMPLED:
        assert decision.temperature == pytest.approx(kw["temperature"])
    if kind is RowKind.DENSE:
        assert decision.reason


@pytest.mark.parametrize(
    "extra, asked",
    [
        (None, False),
        ({}, False),
        ({"flashhead_shadow": 1}, True),
        ({"flashhead_shadow": "true"}, True),
        ({"flashhead_shadow": 0}, False),
        ({"flashhead_shadow": "no"}, False),
        ({"flashhead_shadow": [1]}, False),
        ({"other": 1}, False),
    ],
)
def test_a_greedy_request_can_ask_for_the_shadow_check(extra, asked):
    decision = classify(params(temperature=0.0, extra_args=extra))
    assert decision.kind is RowKind.GREEDY and decision.shadow is asked
    # Sampled rows are never shadowed (their top-1 is a draw), asked or not.
    assert not classify(params(temperature=0.8, extra_args=extra)).shadow


def test_classify_empty_collections_are_not_features():
    assert classify(params(temperature=0.0, logit_bias={}, bad_words=[])).kind is RowKind.GREEDY


def test_classify_without_params_is_dense():
    assert classify(None).kind is RowKind.DENSE


@pytest.mark.vllm
def test_real_sampling_params():
    from vllm.sampling_params import SamplingParams as sp

    assert classify(sp(temperature=0.0)).kind is RowKind.GREEDY
    assert classify(sp(temperature=0.9, seed=1)).kind is RowKind.SAMPLED
    assert classify(sp(temperature=0.0, logprobs=2)).kind is RowKind.DENSE
    assert classify(sp(temperature=0.0, logit_bias={3: 1.0})).kind is RowKind.DENSE


def test_no_scope_no_plan():
    assert current_plan() is None
    plan, why = plan_for_rows(3)
    assert plan is None and "no step plan" in why


def test_scope_is_lazy_and_built_once():
    calls = []

    def build():
        calls.append(1)
        return greedy_plan(2)

    with plan_scope(build):
        assert calls == []  # built on first use, after the runner updated its batch
        assert plan_for_rows(2)[0] is not None
        assert plan_for_rows(2)[0] is current_plan()
        assert len(calls) == 1
    assert current_plan() is None


def test_row_count_mismatch_is_dense():
    with plan_scope(greedy_plan(4)):
        plan, why = plan_for_rows(5)
    assert plan is None and "4 rows" in why


def test_all_dense_plan():
    with plan_scope(dense_plan("prompt logprobs")):
        plan, why = plan_for_rows(0)
    assert plan is None and why == "prompt logprobs"


def test_failing_builder_gives_dense():
    def build():
        raise KeyError("req-x")

    with plan_scope(build):
        plan, why = plan_for_rows(1)
    assert plan is None and "KeyError" in why


def test_nested_scopes_restore():
    with plan_scope(greedy_plan(1)):
        with plan_scope(dense_plan("inner")):
            assert plan_for_rows(1)[0] is None
        assert plan_for_rows(1)[0] is not None


# ---- V1 runner -------------------------------------------------------------------------


def fake_v1_runner(reqs, *, spec=None):
    """reqs: list of (req_id, SamplingParams-like, num_computed_tokens) in batch order."""
    batch = types.SimpleNamespace(
        req_ids=[r for r, _, _ in reqs],
        num_computed_tokens_cpu=np.array([n for _, _, n in reqs], dtype=np.int32),
        # vLLM's own per-request generators: FlashHead must never draw from these.
        generators={i: torch.Generator().manual_seed(99) for i in range(len(reqs))},
    )
    requests = {r: types.SimpleNamespace(sampling_params=p) for r, p, _ in reqs}
    return types.SimpleNamespace(input_batch=batch, requests=requests, speculative_config=spec)


def sched(**num_scheduled):
    return types.SimpleNamespace(num_scheduled_tokens=num_scheduled)


def draw(gen):
    return torch.rand(4, generator=gen)


def test_v1_plan_rows_follow_batch_order():
    runner = fake_v1_runner(
        [
            ("a", params(temperature=0.0, seed=3), 5),
            ("b", params(temperature=0.5, seed=7), 9),
            ("c", params(temperature=0.0, logprobs=1), 2),
            ("d", params(temperature=0.5), 4),
        ]
    )
    plan = runner_v1.build_plan(runner, sched(a=1, b=1, c=1, d=1))
    kinds = [d.kind for d in plan.decisions]
    assert kinds == [RowKind.GREEDY, RowKind.SAMPLED, RowKind.DENSE, RowKind.SAMPLED]
    assert plan.flash_rows() == [0, 1, 3] and plan.dense_rows() == [2]
    # Only seeded sampled rows get a generator, and it is FlashHead's own.
    assert plan.generator(0) is None and plan.generator(3) is None
    gen = plan.generator(1)
    assert gen is not None and all(gen is not g for g in runner.input_batch.generators.values())
    assert torch.equal(draw(gen), draw(seeded_generator(7, 10)))


def test_v1_seeded_noise_depends_on_position_not_batch():
    alone = fake_v1_runner([("b", params(temperature=0.5, seed=7), 9)])
    batched = fake_v1_runner(
        [("x", params(temperature=0.5, seed=1), 3), ("b", params(temperature=0.5, seed=7), 9)]
    )
    g_alone = runner_v1.build_plan(alone, sched(b=1)).generator(0)
    g_batched = runner_v1.build_plan(batched, sched(x=4, b=1)).generator(1)
    assert torch.equal(draw(g_alone), draw(g_batched))
    # A prefill chunked differently reaches the same position at its sampling step.
    chunked = fake_v1_runner([("b", params(temperature=0.5, seed=7), 6)])
    assert torch.equal(
        draw(runner_v1.build_plan(chunked, sched(b=4)).generator(0)),
        draw(seeded_generator(7, 10)),
    )
    next_step = runner_v1.build_plan(
        fake_v1_runner([("b", params(temperature=0.5, seed=7), 10)]), sched(b=1)
    )
    assert not torch.equal(draw(next_step.generator(0)), draw(seeded_generator(7, 10)))


def test_v1_spec_decode_is_dense_unless_the_patchset_serves_drafts():
    runner = fake_v1_runner([("a", params(temperature=0.0), 0)], spec=object())
    plan = runner_v1.build_plan(runner)
    assert plan.all_dense_reason.startswith("speculative decoding: ")
    assert "support.spec_decode: dense" in plan.all_dense_reason


def spec_sched(drafts, **num_scheduled):
    return types.SimpleNamespace(
        num_scheduled_tokens=num_scheduled, scheduled_spec_decode_tokens=drafts
    )


def test_v1_verification_rows_repeat_each_request_per_draft_token():
    runner = fake_v1_runner(
        [
            ("a", params(temperature=0.0), 5),
            ("b", params(temperature=0.0, logprobs=1), 9),
            ("c", params(temperature=0.5, seed=7), 4),
            ("d", params(temperature=0.0), 20),  # a prefill chunk: no drafts, one row
        ],
        spec=object(),
    )
    # vLLM's logits rows: per request in batch order, one per draft token plus one.
    sched_out = spec_sched({"a": [11, 12, 13], "c": [5, 6]}, a=4, b=1, c=3, d=64)
    plan = runner_v1.build_plan(runner, sched_out, drafts=True)
    kinds = [d.kind for d in plan.decisions]
    assert kinds == [RowKind.GREEDY] * 4 + [RowKind.DENSE] + [RowKind.SAMPLED] * 3 + [
        RowKind.GREEDY
    ]
    assert plan.num_rows == 9 and plan.dense_rows() == [4]
    assert all(d.temperature == 0.5 for d in plan.decisions[5:8])
    # Row j of "c" predicts the token at position 4 + 1 + j: the generator a step without
    # speculation would give that position, so the candidate draw per position is the same.
    for row, position in zip(range(5, 8), (5, 6, 7)):
        assert torch.equal(draw(plan.generator(row)), draw(seeded_generator(7, position)))
    plain = runner_v1.build_plan(
        fake_v1_runner([("c", params(temperature=0.5, seed=7), 4)]), sched(c=1)
    )
    again = runner_v1.build_plan(runner, sched_out, drafts=True)  # generators are stateful
    assert torch.equal(draw(plain.generator(0)), draw(again.generator(5)))
    assert plan.generator(0) is None and plan.generator(8) is None


def test_v1_speculative_step_without_drafts_has_one_row_per_request():
    runner = fake_v1_runner(
        [("a", params(temperature=0.0), 5), ("b", params(temperature=0.0), 7)], spec=object()
    )
    plan = runner_v1.build_plan(runner, spec_sched({}, a=1, b=1), drafts=True)
    assert plan.num_rows == 2 and not plan.all_dense_reason


def test_v1_execute_model_wrapper_plans_after_batch_update():
    runner = fake_v1_runner([])
    seen = {}

    def execute_model(scheduler_output, intermediate_tensors=None):
        # vLLM updates the batch inside execute_model, before computing logits.
        runner.input_batch.req_ids.append("x")
        runner.input_batch.num_computed_tokens_cpu = np.array([0])
        runner.requests["x"] = types.SimpleNamespace(sampling_params=params(temperature=0.0))
        seen["plan"] = plan_for_rows(1)[0]
        return "out"

    assert runner_v1.execute_model(execute_model, runner, (sched(x=3),), {}) == "out"
    assert seen["plan"].decisions[0].kind is RowKind.GREEDY
    assert current_plan() is None


def test_v1_prompt_logprobs_wrapper_is_dense():
    def get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens):
        return plan_for_rows(2)

    plan, why = runner_v1.prompt_logprobs(get_prompt_logprobs_dict, None, (None, {}), {})
    assert plan is None and why == "prompt logprobs"


def test_v1_dummy_sampler_run_is_greedy():
    def dummy_sampler_run(hidden_states):
        return plan_for_rows(hidden_states.shape[0])[0]

    plan = runner_v1.dummy_sampler_run(dummy_sampler_run, None, (torch.zeros(3, 4),), {})
    assert [d.kind for d in plan.decisions] == [RowKind.GREEDY] * 3


# ---- V2 runner -------------------------------------------------------------------------


def fake_v2(slots_params):
    """slots_params: {req_idx: SamplingParams-like}; returns (runner, sampler)."""
    sampler = types.SimpleNamespace()

    def add_request(req_idx, sampling_params):
        return None

    for idx, p in slots_params.items():
        runner_v2.sampler_add_request(add_request, sampler, (idx, p), {})
    return types.SimpleNamespace(sampler=sampler, batch_sharder=None), sampler


def v2_batch(slots, computed, scheduled, drafts=0):
    n = len(slots)
    return types.SimpleNamespace(
        num_reqs=n,
        idx_mapping_np=np.array(slots, dtype=np.int32),
        num_computed_tokens_np=np.array(computed, dtype=np.int32),
        num_scheduled_tokens=np.array(scheduled, dtype=np.int32),
        num_draft_tokens=drafts,
    )


def test_v2_plan_maps_batch_rows_to_slots():
    runner, _ = fake_v2(
        {
            3: params(temperature=0.0),
            0: params(temperature=0.9, seed=11),
            5: params(temperature=0.0, bad_words=["no"]),
        }
    )
    plan = runner_v2.build_plan(runner, v2_batch([0, 5, 3], [4, 2, 9], [1, 1, 1]))
    assert [d.kind for d in plan.decisions] == [RowKind.SAMPLED, RowKind.DENSE, RowKind.GREEDY]
    assert plan.generator(0) is not None and plan.generator(2) is None


def test_v2_seeded_generator_repeats_and_moves_with_position():
    runner, _ = fake_v2({0: params(temperature=0.9, seed=11)})
    a = runner_v2.build_plan(runner, v2_batch([0], [4], [1])).generator(0)
    b = runner_v2.build_plan(runner, v2_batch([0], [4], [1])).generator(0)
    c = runner_v2.build_plan(runner, v2_batch([0], [5], [1])).generator(0)
    ra, rb, rc = draw(a), draw(b), draw(c)
    assert torch.equal(ra, rb)
    assert not torch.equal(ra, rc)


def test_v2_unknown_slot_is_dense_and_spec_decode_is_dense():
    runner, _ = fake_v2({})
    plan = runner_v2.build_plan(runner, v2_batch([2], [0], [1]))
    assert plan.decisions[0].kind is RowKind.DENSE
    runner, _ = fake_v2({0: params(temperature=0.0)})
    plan = runner_v2.build_plan(runner, v2_batch([0], [0], [1], drafts=2))
    assert plan.all_dense_reason == "speculative decoding"


def test_v2_sample_wrapper_scopes_plan():
    runner, _ = fake_v2({1: params(temperature=0.0)})
    batch = v2_batch([1], [3], [1])

    def sample(hidden_states, input_batch, grammar_output):
        return plan_for_rows(1)[0]

    plan = runner_v2.sample(sample, runner, (torch.zeros(1, 2), batch, None), {})
    assert plan.decisions[0].kind is RowKind.GREEDY
    assert current_plan() is None
