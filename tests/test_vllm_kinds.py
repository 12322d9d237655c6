"""The two vLLM-specific patch kinds (register_oot, register_architecture) and their undo."""

from __future__ import annotations

import pytest

from flashhead.engine import PatchEngine
from flashhead.registry import PatchSpec
from flashhead.vllm_kinds import find_oot_registry, vllm_kinds


def oot(target: str, handler: str = "fakelib.handlers:make_processor", **kw) -> PatchSpec:
    return PatchSpec(
        id="lp", kind="register_oot", target=target, handler=handler, why="t", remove_when="t", **kw
    )


@pytest.mark.parametrize("cls_name", ["LogitsProcessor", "OldLogitsProcessor"])
def test_register_oot_and_undo(cls_name):
    import fakelib.layers as layers

    base = getattr(layers, cls_name)
    registry = find_oot_registry(base)
    assert registry is (
        layers.op_registry_oot if cls_name == "LogitsProcessor" else layers.CustomOp.op_registry_oot
    )
    engine, second = PatchEngine(vllm_kinds()), PatchEngine(vllm_kinds())
    sig = (
        "(self, lm_head, hidden_states, embedding_bias=None)"
        if cls_name == "LogitsProcessor"
        else "(self, lm_head, hidden_states)"
    )
    [rec] = engine.apply(
        [oot(f"fakelib.layers:{cls_name}", signature=sig, signature_of="forward")],
        set_id="s",
        enabled=lambda: True,
    )
    assert rec.status == "applied", rec.reason
    obj = base(10)
    assert type(obj).__name__ == "FlashHeadFake" and obj.forward(None, "h") == ("flashhead", "h")
    # A second engine (or register() again) replaces its own entry instead of tripping the assert.
    [rec2] = second.apply([oot(f"fakelib.layers:{cls_name}")], set_id="s", enabled=lambda: True)
    assert rec2.status == "applied", rec2.reason
    second.unpatch()
    engine.unpatch()
    assert cls_name not in registry
    assert type(base(10)) is base


def test_register_oot_failures():
    import fakelib.layers as layers

    engine = PatchEngine(vllm_kinds())
    [rec] = engine.apply([oot("fakelib.layers:PlainModule")], set_id="a", enabled=lambda: True)
    assert rec.status == "missing-target" and "no register_oot hook" in rec.reason
    [rec] = engine.apply(
        [oot("fakelib.layers:LogitsProcessor", handler="fakelib.handlers:not_a_subclass")],
        set_id="b",
        enabled=lambda: True,
    )
    assert rec.status == "handler-error" and "not a subclass" in rec.reason
    [rec] = engine.apply(
        [
            oot(
                "fakelib.layers:LogitsProcessor",
                signature="(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False)",
                signature_of="forward",
            )
        ],
        set_id="c",
        enabled=lambda: True,
    )
    assert rec.status == "signature-mismatch" and "gone: skip_gather" in rec.reason

    class Foreign(layers.LogitsProcessor):
        pass

    layers.op_registry_oot["LogitsProcessor"] = Foreign
    try:
        [rec] = engine.apply(
            [oot("fakelib.layers:LogitsProcessor")], set_id="d", enabled=lambda: True
        )
        assert rec.status == "handler-error" and "another plugin" in rec.reason
        assert layers.op_registry_oot["LogitsProcessor"] is Foreign
    finally:
        del layers.op_registry_oot["LogitsProcessor"]
    engine.unpatch()


def test_register_architecture_undo_restores_a_previous_entry(monkeypatch):
    import fakelib.registry as registry

    reg = registry.fresh_registry()
    reg.register_model("FlashHeadLlamaForCausalLM", "someone.else:Model")
    before = reg.models["FlashHeadLlamaForCausalLM"]
    monkeypatch.setattr(registry, "ModelRegistry", reg)
    spec = PatchSpec(
        id="a",
        kind="register_architecture",
        target="fakelib.registry:ModelRegistry",
        architectures={"FlashHeadLlamaForCausalLM": "LlamaForCausalLM"},
        why="t",
        remove_when="t",
    )
    engine = PatchEngine(vllm_kinds())
    [rec] = engine.apply([spec], set_id="s", enabled=lambda: True)
    assert (
        rec.status == "applied"
        and reg.models["FlashHeadLlamaForCausalLM"] == reg.models["LlamaForCausalLM"]
    )
    engine.unpatch()
    assert reg.models["FlashHeadLlamaForCausalLM"] is before


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_kinds_on_real_vllm():
    from vllm import ModelRegistry
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    engine = PatchEngine(vllm_kinds())
    specs = [
        PatchSpec(
            id="archs",
            kind="register_architecture",
            target="vllm.model_executor.models.registry:ModelRegistry",
            architectures={
                "FlashHeadLlamaForCausalLM": "LlamaForCausalLM",
                "FlashHeadNopeForCausalLM": "NopeForCausalLM",
            },
            why="t",
            remove_when="t",
        ),
        oot("vllm.model_executor.layers.logits_processor:LogitsProcessor"),
    ]
    records = engine.apply(specs, set_id="s", enabled=lambda: True)
    try:
        assert [r.status for r in records] == ["applied", "applied"], [r.reason for r in records]
        assert "FlashHeadLlamaForCausalLM" in ModelRegistry.get_supported_archs()
        assert records[0].details["missing_bases"] == {
            "FlashHeadNopeForCausalLM": "NopeForCausalLM"
        }
        assert find_oot_registry(LogitsProcessor)["LogitsProcessor"].__name__ == "FlashHeadFake"
    finally:
        engine.unpatch()
    assert "FlashHeadLlamaForCausalLM" not in ModelRegistry.get_supported_archs()
    assert "LogitsProcessor" not in find_oot_registry(LogitsProcessor)
