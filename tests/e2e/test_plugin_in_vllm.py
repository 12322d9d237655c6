"""The plugin inside a real `vllm serve`: every process registers, patches reach the worker,
bad patchset files are reported with file:line and vLLM still serves, doctor tells the truth.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.server import vllm_server
from helpers.tiny_models import cached_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.e2e]

ARCHITECTURES = """\
  - id: architectures
    kind: register_architecture
    target: "vllm.model_executor.models.registry:ModelRegistry"
    architectures:
      FlashHeadLlamaForCausalLM: LlamaForCausalLM
      FlashHeadQwen3ForCausalLM: Qwen3ForCausalLM
    always: true
    process: any
    required: true
    why: "FlashHead* architectures"
    remove_when: "never"
"""
# LogitsProcessor.forward has kept these four leading parameters since 0.11; only the trailing
# skip_gather differs, so the test picks the declared signature from the installed release.
OBSERVE = """\
  - id: observe-logits
    kind: wrap
    target: "vllm.model_executor.layers.logits_processor:LogitsProcessor.forward"
    handler: "flashhead.handlers.observe:count_logits_calls"
    signature: "{signature}"
    process: [worker]
    required: true
    why: "proves that patches reach the worker's logits path"
    remove_when: "never"
"""
BROKEN_FILES = {
    # name: (text, expected "file:line: field" fragment in the log)
    "vllm-0.10.yaml": (
        "schema: 1\nvllm: '>=0.10,<0.11'\n  - oops\npatches: []\n",
        "vllm-0.10.yaml:3: (yaml): syntax error",
    ),
    "vllm-0.11.yaml": (
        "schema: 1\nvllm: '>=0.11,<0.12'\ncolour: red\npatches: []\n",
        "vllm-0.11.yaml:3: colour: unknown field",
    ),
    "vllm-0.12.yaml": (
        "schema: 1\nvllm: '>=0.12,<<0.13'\npatches: []\n",
        "vllm-0.12.yaml:2: vllm: bad version range",
    ),
}


def _installed_release(python: str) -> tuple[int, ...]:
    out = subprocess.run(
        [
            python,
            "-c",
            "from flashhead.compat.version import detect_vllm_version as d; print(d().release_for_matching)",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    return tuple(int(x) for x in out.split("."))


def _forward_signature(release: tuple[int, ...]) -> str:
    if release >= (0, 29):
        return "(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False)"
    return "(self, lm_head, hidden_states, embedding_bias=None)"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    cache = os.environ.get("FLASHHEAD_TEST_CACHE") or str(
        Path.home() / ".cache" / "flashhead" / "test-models"
    )
    return cached_tiny_model(cache, arch="llama", vocab_size=32000, hidden=128, layers=2, seed=0)


def _model_copy(base: Path, dest: Path, architecture: str) -> Path:
    shutil.copytree(base, dest)
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [architecture]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return dest


def _serve_one_completion(
    model: Path, psdir: Path, log_path: Path, python: str, prompt: str
) -> tuple[str, str]:
    """(completion text, server log) of one greedy request to `model` served with `psdir`."""
    env = {"FLASHHEAD_PATCHSET_DIR": str(psdir)}
    with vllm_server(model, log_path, python=python, env=env) as server:
        text = server.complete(prompt, max_tokens=8, temperature=0.0)["choices"][0]["text"]
        return text, server.log()


def _startup_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"\[flashhead\] flashhead \d", line)]


def test_plugin_in_every_process_patches_reach_the_worker(base_model, tmp_path, test_python):
    """A FlashHead-architecture model serves; api, engine and worker each log their start-up line."""
    release = _installed_release(test_python)
    psdir = tmp_path / "patchsets"
    psdir.mkdir()
    good = f'schema: 1\nvllm: ">=0.26,<0.40"\npatches:\n{ARCHITECTURES}{OBSERVE.format(signature=_forward_signature(release))}'
    (psdir / "vllm-0.26.yaml").write_text(good)
    for name, (text, _) in BROKEN_FILES.items():
        (psdir / name).write_text(text)
    model = _model_copy(base_model, tmp_path / "model", "FlashHeadLlamaForCausalLM")

    text, log = _serve_one_completion(
        model, psdir, tmp_path / "server.log", test_python, "def add(a, b):"
    )
    assert isinstance(text, str) and text

    lines = _startup_lines(log)
    kinds = {re.search(r"process (\w+) \(", line).group(1) for line in lines}
    assert {"api", "engine", "worker"} <= kinds, lines
    for line in lines:
        assert "patchset vllm-0.26.yaml" in line, line
        assert "failed 0" in line, line
    [worker_line] = [line for line in lines if "process worker (" in line]
    assert "applied" in worker_line
    assert "observe-logits: first logits call in worker process" in log
    for _, fragment in BROKEN_FILES.values():
        assert f"{psdir}/{fragment}" in log, fragment


def test_broken_matching_patchset_still_serves(base_model, tmp_path, test_python):
    """The file for this release is invalid: it is reported with file:line, and vLLM runs stock."""
    psdir = tmp_path / "patchsets"
    psdir.mkdir()
    broken = f'schema: 1\nvllm: ">=0.26,<0.40"\npatches:\n{ARCHITECTURES}    colour: red\n'
    (psdir / "vllm-0.26.yaml").write_text(broken)
    model = _model_copy(base_model, tmp_path / "model", "LlamaForCausalLM")
    text, log = _serve_one_completion(
        model, psdir, tmp_path / "server.log", test_python, "import os\n"
    )
    assert isinstance(text, str) and text
    assert f"{psdir}/vllm-0.26.yaml:15: patches[0](architectures).colour: unknown field" in log
    lines = _startup_lines(log)
    assert lines and all(
        "patchset none" in line and "unreadable: vllm-0.26.yaml" in line for line in lines
    ), lines


def test_doctor_json_reports_the_shipped_patchset(test_python):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLASHHEAD_") or k == "FLASHHEAD_TEST_PYTHON"
    }
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [test_python, "-m", "flashhead.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    report = json.loads(proc.stdout)
    expected = subprocess.run(
        [
            test_python,
            "-c",
            "from flashhead.compat.version import detect_vllm_version as d\n"
            "from flashhead.registry import load_patchsets, select_patchset\n"
            "print(select_patchset(load_patchsets().patchsets, d().release_for_matching).name)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    ).stdout.strip()
    assert report["patchset"]["name"] == expected
    required = [p for p in report["patches"] if p["required"]]
    assert required and all(p["status"] == "applied" for p in required), required
    assert report["ok"] and proc.returncode == 0, proc.stderr[-2000:]
