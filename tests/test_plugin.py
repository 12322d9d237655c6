"""register(): idempotent, never raises, FLASHHEAD_ENABLED=0, process filter (the vLLM patch kinds: test_vllm_kinds.py; process and version detection: test_compat.py).

Runs against fake host objects (tests/fixtures/fakelib) through FLASHHEAD_PATCHSET_DIR; the
`vllm`-marked tests at the end use the installed vLLM's real registry and layer hook.
"""

from __future__ import annotations

import logging

import pytest

from flashhead import plugin, runtime, settings
from flashhead.compat.process import ProcessInfo
from flashhead.engine import PatchEngine
from flashhead.handlers import observe
from flashhead.vllm_kinds import vllm_kinds

ARCHS = """\
  - id: architectures
    kind: register_architecture
    target: "fakelib.registry:ModelRegistry"
    architectures:
      FlashHeadLlamaForCausalLM: LlamaForCausalLM
      FlashHeadEagerForCausalLM: EagerForCausalLM
      FlashHeadGemma3ForCausalLM: Gemma3ForCausalLM
    always: true
    why: "archs"
    remove_when: "never"
"""
OBSERVE = """\
  - id: observe
    kind: wrap
    target: "fakelib.core:add"
    handler: "flashhead.handlers.observe:count_logits_calls"
    signature: "(a, b=1)"
    process: {process}
    required: {required}
    why: "observe"
    remove_when: "never"
"""
BROKEN = """\
  - id: broken
    kind: wrap
    target: "fakelib.core:does_not_exist"
    handler: "flashhead.handlers.observe:count_logits_calls"
    signature: "(a)"
    why: "fails"
    remove_when: "never"
"""


def patchset(*patches: str, vllm: str = ">=0.29,<0.34", extra: str = "") -> str:
    return f'schema: 1\nvllm: "{vllm}"\n{extra}patches:\n' + "".join(patches)


@pytest.fixture
def env(tmp_path, monkeypatch, clean_flashhead_env):
    import fakelib.core as core
    import fakelib.registry as registry

    monkeypatch.setenv("FLASHHEAD_PATCHSET_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHHEAD_VLLM_VERSION", "0.32.0+cpu")
    monkeypatch.setattr(registry, "ModelRegistry", registry.fresh_registry())
    plugin._reset_for_tests()
    observe.reset_logits_call_count()
    original_add = core.add
    yield tmp_path
    plugin._reset_for_tests()
    assert core.add is original_add, "register() patches must be undone by runtime.reset()"


def write(directory, name: str, text: str) -> None:
    (directory / name).write_text(text)


def archs():
    import fakelib.registry as registry

    return registry.ModelRegistry.models


def test_register_applies_and_is_idempotent(env):
    import fakelib.core as core

    write(env, "vllm-0.29.yaml", patchset(ARCHS, OBSERVE.format(process="any", required="true")))
    plugin.register()
    plugin.register()
    act = runtime.activation()
    assert act.patchset.name == "vllm-0.29.yaml"
    assert [(r.patch_id, r.status) for r in act.records] == [
        ("architectures", "applied"),
        ("observe", "applied"),
    ]
    assert core.add(1) == 2
    assert observe.logits_call_count() == 1  # wrapped once, not twice
    assert runtime.flashhead_active()
    models = archs()
    assert models["FlashHeadLlamaForCausalLM"] == models["LlamaForCausalLM"]
    assert models["FlashHeadEagerForCausalLM"].model_cls is models["EagerForCausalLM"].model_cls
    assert "FlashHeadGemma3ForCausalLM" not in models
    [arch_record] = [r for r in act.records if r.patch_id == "architectures"]
    assert arch_record.details["missing_bases"] == {
        "FlashHeadGemma3ForCausalLM": "Gemma3ForCausalLM"
    }


def test_start_up_log_line(env, caplog):
    write(
        env, "vllm-0.29.yaml", patchset(ARCHS, OBSERVE.format(process="[worker]", required="true"))
    )
    with caplog.at_level(logging.INFO, logger="flashhead"):
        plugin.register()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("flashhead 0.")]
    assert len(lines) == 1
    line = lines[0]
    assert "vLLM 0.32.0+cpu (env FLASHHEAD_VLLM_VERSION)" in line
    assert "process main (MainProcess" in line
    assert "patchset vllm-0.29.yaml" in line
    assert "applied 2, pending 0, skipped 0, failed 0" in line


def test_enabled_0_still_registers_architectures(env, monkeypatch):
    import fakelib.core as core

    monkeypatch.setenv("FLASHHEAD_ENABLED", "0")
    write(env, "vllm-0.29.yaml", patchset(ARCHS, OBSERVE.format(process="any", required="true")))
    plugin.register()
    act = runtime.activation()
    status = {r.patch_id: r.status for r in act.records}
    assert status == {"architectures": "applied", "observe": "disabled"}
    assert "FlashHeadLlamaForCausalLM" in archs()
    assert core.add(1) == 2 and observe.logits_call_count() == 0
    assert not runtime.flashhead_active()
    assert "FLASHHEAD_ENABLED=0" in act.log_line()


def test_a_bad_kill_switch_value_is_logged_and_serves_dense(env, monkeypatch, caplog):
    """FLASHHEAD_ENABLED=disable is no boolean: the safe reading is off (dense), said once."""
    import fakelib.core as core

    monkeypatch.setenv("FLASHHEAD_ENABLED", "disable")
    write(env, "vllm-0.29.yaml", patchset(ARCHS, OBSERVE.format(process="any", required="true")))
    with caplog.at_level(logging.ERROR, logger="flashhead"):
        plugin.register()
        plugin.register()
    said = [r.getMessage() for r in caplog.records if "FLASHHEAD_ENABLED" in r.getMessage()]
    assert said == [
        "flashhead: setting ignored: FLASHHEAD_ENABLED='disable' is not a boolean (1/0, "
        "true/false, yes/no, on/off); serving dense until it is one"
    ]
    assert not runtime.flashhead_active() and core.add(1) == 2
    assert "FlashHeadLlamaForCausalLM" in archs()


def test_process_filter(env, monkeypatch):
    write(
        env, "vllm-0.29.yaml", patchset(ARCHS, OBSERVE.format(process="[worker]", required="true"))
    )
    monkeypatch.setattr(plugin, "current_process", lambda: ProcessInfo("api", "MainProcess", 1))
    plugin.register()
    status = {r.patch_id: (r.status, r.reason) for r in runtime.activation().records}
    assert status["observe"] == ("skipped-process", "needed in worker, this is api")
    assert status["architectures"][0] == "applied"


def test_engine_core_hosts_worker_patches(env):
    """With the uniprocess executor the worker runs inside EngineCore: worker patches apply there."""
    write(env, "vllm-0.29.yaml", patchset(OBSERVE.format(process="[worker]", required="true")))
    engine = PatchEngine(vllm_kinds())
    act = plugin.activate(engine, process=ProcessInfo("engine", "EngineCore", 1))
    try:
        assert [r.status for r in act.records] == ["applied"]
    finally:
        engine.unpatch()


def test_required_failure_rolls_back_but_keeps_architectures(env, caplog):
    import fakelib.core as core

    write(
        env,
        "vllm-0.29.yaml",
        patchset(ARCHS, OBSERVE.format(process="any", required="true"), BROKEN),
    )
    with caplog.at_level(logging.INFO, logger="flashhead"):
        plugin.register()
    status = {r.patch_id: r.status for r in runtime.activation().records}
    assert status == {
        "architectures": "applied",
        "observe": "rolled-back",
        "broken": "missing-target",
    }
    assert core.add(1) == 2
    assert "FlashHeadLlamaForCausalLM" in archs()
    assert not runtime.flashhead_active()
    assert "patch broken: missing-target" in caplog.text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("schema: 1\nvllm: '>=0.29'\n  - oops\npatches: []\n", ":3: (yaml): syntax error"),
        (
            patchset(ARCHS.replace("    always: true\n", "    always: true\n    colour: red\n")),
            ":12: patches[0](architectures).colour: unknown field",
        ),
        (patchset(ARCHS, vllm=">=0.29,<=0.2x"), ":2: vllm: bad version range"),
    ],
)
def test_broken_yaml_never_raises(env, caplog, text, fragment):
    write(env, "vllm-0.29.yaml", text)
    with caplog.at_level(logging.INFO, logger="flashhead"):
        plugin.register()  # must not raise
    act = runtime.activation()
    assert act.patchset is None and act.records == []
    assert "no patchset for vLLM 0.32.0" in act.note and "unreadable: vllm-0.29.yaml" in act.note
    assert any(fragment in p for p in act.problems), act.problems
    assert f"vllm-0.29.yaml{fragment}" in caplog.text
    assert not runtime.flashhead_active()


def test_a_broken_file_does_not_hide_the_good_one(env):
    write(env, "vllm-0.10.yaml", "schema: 1\nvllm: '>=0.10,<0.11'\n  - oops\npatches: []\n")
    write(env, "vllm-0.29.yaml", patchset(ARCHS))
    plugin.register()
    act = runtime.activation()
    assert act.patchset.name == "vllm-0.29.yaml"
    assert act.problems and "vllm-0.10.yaml:3" in act.problems[0]


def test_overlapping_ranges_are_reported(env):
    write(env, "vllm-0.29.yaml", patchset(ARCHS))
    write(env, "vllm-0.30.yaml", patchset(ARCHS, vllm=">=0.30,<0.40"))
    plugin.register()
    act = runtime.activation()
    assert act.patchset.name == "vllm-0.29.yaml"  # deterministic: first by file name
    assert any("overlaps vllm-0.29.yaml" in p for p in act.problems)


def test_no_vllm_means_no_patches(env, monkeypatch):
    monkeypatch.setenv("FLASHHEAD_VLLM_VERSION", "not a version")
    write(env, "vllm-0.29.yaml", patchset(ARCHS))
    plugin.register()
    act = runtime.activation()
    assert act.records == [] and "vLLM not found" in act.note


def test_register_survives_an_internal_error(env, monkeypatch, caplog):
    def explode(*a, **k):
        raise RuntimeError("bug in activate")

    monkeypatch.setattr(plugin, "activate", explode)
    with caplog.at_level(logging.INFO, logger="flashhead"):
        plugin.register()
    assert "error: RuntimeError: bug in activate" in caplog.text
    assert not runtime.flashhead_active()


def test_register_survives_even_the_logger(env, monkeypatch):
    def explode():
        raise KeyboardInterrupt  # BaseException: still not allowed to escape into vLLM

    monkeypatch.setattr(plugin, "_register_once", explode)
    plugin.register()


def test_kill_switch_stops_flashhead_patches(env):
    import fakelib.core as core

    write(env, "vllm-0.29.yaml", patchset(OBSERVE.format(process="any", required="true")))
    plugin.register()
    assert core.add(1) == 2 and observe.logits_call_count() == 1
    runtime.kill("test")
    assert not runtime.flashhead_active()
    core.add(1)
    assert observe.logits_call_count() == 1
    runtime.revive()
    core.add(1)
    assert observe.logits_call_count() == 2


# -- the vLLM kinds against fakes -------------------------------------------------------------


# -- the vLLM kinds against the installed vLLM ------------------------------------------------


# -- process kinds ------------------------------------------------------------------------------


@pytest.mark.parametrize("root_level, ours", [(logging.ERROR, True), (logging.NOTSET, False)])
def test_start_up_line_visible_whatever_the_root_handler(monkeypatch, root_level, ours):
    """vLLM 0.16's API server carries a root handler at ERROR: relying on it hid the start-up
    line there. A root handler that lets INFO through is used as it is (no duplicate lines)."""
    from flashhead import plugin

    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setLevel(root_level)
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(plugin.logger, "handlers", [])
    monkeypatch.delenv(settings.LOG_LEVEL_ENV, raising=False)
    plugin._ensure_log_handler()
    assert bool(plugin.logger.handlers) is ours
