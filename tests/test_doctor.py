"""`flashhead doctor`: same registry + engine as the plugin, force_import, undo, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashhead import cli, settings
from flashhead.doctor import build_report, format_report

ARCHS = """\
  - id: architectures
    kind: register_architecture
    target: "fakelib.registry:ModelRegistry"
    architectures: {FlashHeadLlamaForCausalLM: LlamaForCausalLM, FlashHeadGemma3ForCausalLM: Gemma3ForCausalLM}
    always: true
    why: "archs"
    remove_when: "never"
"""
LAZY = """\
  - id: lazy-observe
    kind: wrap
    target: "fakelib.lazy:compute"
    handler: "flashhead.handlers.observe:count_logits_calls"
    signature: "(x, y=2)"
    process: [worker]
    why: "observe"
    remove_when: "never"
"""
BROKEN = """\
  - id: broken
    kind: wrap
    target: "fakelib.core:gone"
    handler: "flashhead.handlers.observe:count_logits_calls"
    signature: "(a)"
    why: "fails"
    remove_when: "never"
"""
SUPPORT = "support: {v1_runner: flashhead, v2_runner: dense, spec_decode: absent}\n"


def write_set(directory, *patches: str) -> None:
    text = (
        f'schema: 1\nvllm: ">=0.29,<0.34"\ndescription: "fake set"\n{SUPPORT}patches:\n'
        + "".join(patches)
    )
    (directory / "vllm-0.29.yaml").write_text(text)


@pytest.fixture
def env(tmp_path, monkeypatch, clean_flashhead_env):
    import fakelib.registry as registry

    monkeypatch.setenv("FLASHHEAD_PATCHSET_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHHEAD_VLLM_VERSION", "0.32.0+cpu")
    monkeypatch.setattr(registry, "ModelRegistry", registry.fresh_registry())
    sys.modules.pop("fakelib.lazy", None)
    yield tmp_path
    sys.modules.pop("fakelib.lazy", None)


def test_report_applies_with_force_import_then_undoes(env):
    import fakelib.registry as registry

    write_set(env, ARCHS, LAZY)
    report = build_report()
    status = {p["id"]: p["status"] for p in report["patches"]}
    # force_import: the lazy module is imported, so nothing stays pending; [worker] applies too.
    assert status == {"architectures": "applied", "lazy-observe": "applied"}
    assert report["ok"] and report["required_failed"] == []
    assert report["patchset"]["name"] == "vllm-0.29.yaml"
    assert report["vllm"]["source"] == "env FLASHHEAD_VLLM_VERSION"
    assert report["vllm"]["release_for_matching"] == "0.32.0"
    assert "local +cpu" in report["vllm"]["note"]
    [arch] = [p for p in report["patches"] if p["id"] == "architectures"]
    assert arch["details"]["missing_bases"] == {"FlashHeadGemma3ForCausalLM": "Gemma3ForCausalLM"}
    # Undone afterwards: the doctor must leave the process as it found it.
    assert "FlashHeadLlamaForCausalLM" not in registry.ModelRegistry.models
    assert sys.modules["fakelib.lazy"].compute(2) == 4
    text = format_report(report)
    assert "patchset:    vllm-0.29.yaml" in text and "OK: every required patch applies" in text
    assert "lazy-observe" in text and "fakelib.lazy:compute" in text


def test_required_failure_exit_code_and_table(env, capsys):
    write_set(env, ARCHS, BROKEN)
    rc = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL: required patches do not apply: broken" in out
    assert "missing-target" in out and "has no attribute 'gone'" in out


def test_json_output(env, capsys):
    write_set(env, ARCHS, LAZY)
    rc = cli.main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"]
    assert [p["id"] for p in report["patches"]] == ["architectures", "lazy-observe"]
    assert set(report["patches"][0]) >= {"id", "target", "kind", "status", "reason", "required"}


def test_no_patchset_fails(env, monkeypatch, capsys):
    write_set(env, ARCHS)
    monkeypatch.setenv("FLASHHEAD_VLLM_VERSION", "0.20.0")
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "no patchset for vLLM 0.20.0" in out and "FAIL: no patchset" in out


def test_yaml_problems_are_listed(env, capsys):
    write_set(env, ARCHS)
    (env / "vllm-0.26.yaml").write_text("schema: 1\nvllm: '>=0.26,<0.29'\n  - x\npatches: []\n")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "patchset problems:" in out and "vllm-0.26.yaml:3: (yaml): syntax error" in out


def test_runner_from_env_and_support_block(env, monkeypatch):
    write_set(env, ARCHS)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    runner = build_report()["runner"]
    assert runner["default"] == "V2" and runner["flashhead"] == "dense"
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    runner = build_report()["runner"]
    assert runner["default"] == "V1" and runner["flashhead"] == "flashhead"


def test_kernel_backend_unknown_without_dispatch(env, monkeypatch):
    write_set(env, ARCHS)
    monkeypatch.setitem(sys.modules, "flashhead.kernels.dispatch", None)  # import fails
    assert build_report()["kernel_backend"] == "unknown"


def test_model_check(env, tmp_path, capsys):
    import torch

    from flashhead.assets import write_assets

    write_set(env, ARCHS)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"architectures": ["FlashHeadLlamaForCausalLM"], "vocab_size": 64})
    )
    write_assets(model, torch.randn(4, 8), torch.arange(64) % 4, n_probes=2)
    assert cli.main(["doctor", "--model", str(model)]) == 0
    out = capsys.readouterr().out
    assert "valid FlashHead model (4 clusters, vocab 64, 2 probes)" in out

    empty = tmp_path / "plain"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert cli.main(["doctor", "--model", str(empty)]) == 1
    out = capsys.readouterr().out
    assert (
        "NOT a valid FlashHead model" in out
        and "FAIL: the model is not a valid FlashHead model" in out
    )


@pytest.mark.vllm
@pytest.mark.slow
def test_doctor_against_installed_vllm(test_python, clean_flashhead_env):
    """The real thing, in its own process: the shipped patchset applies on the installed vLLM."""
    proc = subprocess.run(
        [test_python, "-m", "flashhead.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report["ok"] else 1), proc.stderr[-2000:]
    assert report["ok"], report["required_failed"]
    assert report["patchset"] is not None
    by_id = {p["id"]: p for p in report["patches"]}
    assert by_id["architectures"]["status"] == "applied"
    assert "FlashHeadLlamaForCausalLM" in by_id["architectures"]["details"]["registered"]
    assert all(p["status"] != "pending" for p in report["patches"])  # force_import


NOISY = """\
  - id: noisy
    kind: wrap
    target: "fakelib.noisy:run"
    handler: "flashhead.handlers.observe:count_logits_calls"
    signature: "(x)"
    why: "noisy import"
    remove_when: "never"
"""


def test_json_stays_clean_when_imports_write_to_stdout(env, capfd):
    sys.modules.pop("fakelib.noisy", None)
    write_set(env, ARCHS, NOISY)
    try:
        rc = cli.main(["doctor", "--json"])
    finally:
        sys.modules.pop("fakelib.noisy", None)
    out, err = capfd.readouterr()
    report = json.loads(out)  # nothing but the report on stdout
    assert rc == 0 and {p["id"]: p["status"] for p in report["patches"]}["noisy"] == "applied"
    assert "noisy import on stdout" in err


def test_watching_line_names_shadow_guard_and_bad_values(env, monkeypatch, capsys):
    write_set(env, ARCHS)
    monkeypatch.setenv("FLASHHEAD_SHADOW", "0.01")
    monkeypatch.setenv("FLASHHEAD_SHADOW_MIN_AGREEMENT", "0.98")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "shadow check on 0.01 of greedy rows, guard below 0.98" in out
    monkeypatch.setenv("FLASHHEAD_SHADOW", "half")
    settings.reset_for_tests()  # settings are parsed once per process: a new process, here
    report = build_report()["watching"]
    assert report["shadow"] == 0.0 and "FLASHHEAD_SHADOW='half'" in report["problems"][0]


def test_without_vllm_the_doctor_says_to_install_it(env, monkeypatch, capsys):
    import flashhead.compat.version as version

    write_set(env, ARCHS)
    monkeypatch.delenv("FLASHHEAD_VLLM_VERSION")
    monkeypatch.setattr(version, "_DISTRIBUTIONS", ("no-such-distribution",))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "vLLM:        not found (absent)" in out
    assert "FAIL: vLLM is not installed in this environment: install it (`pip install vllm`" in out


def test_doctor_says_when_a_gpu_serves_the_model_dense(monkeypatch):
    """A head of more clusters than the GPU select handles fast is served dense there: the
    doctor says so next to the model (no silent fallback), and only where Triton would run."""
    from flashhead import doctor
    from flashhead.kernels.dispatch import GPU_MAX_FAST_CLUSTERS

    gemma = {"valid": True, "n_clusters": 65536}
    llama = {"valid": True, "n_clusters": 8016}
    gpu, cpu = {"backend": "triton"}, {"backend": "torch"}
    reason = doctor._gpu_dense_reason(gemma, gpu)
    assert f"65536 clusters > {GPU_MAX_FAST_CLUSTERS}" in reason
    assert doctor._gpu_dense_reason(llama, gpu) == ""
    assert doctor._gpu_dense_reason(gemma, cpu) == ""
    assert doctor._gpu_dense_reason({"valid": False}, gpu) == ""
    monkeypatch.setenv("FLASHHEAD_DENSE_MIN_BATCH", "0")  # the user forces FlashHead
    from flashhead import settings

    settings.reset_for_tests()
    try:
        assert doctor._gpu_dense_reason(gemma, gpu) == ""
    finally:
        settings.reset_for_tests()
