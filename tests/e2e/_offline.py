"""Run ``_offline_run.py`` (``vllm.LLM`` on one model) in a subprocess and compare its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.server import vllm_env

SCRIPT = Path(__file__).with_name("_offline_run.py")


def run_offline(
    model: Path,
    out: Path,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    timeout: float = 600,
) -> dict[str, Any]:
    """The script's JSON outputs, plus ``log`` (its stdout and stderr); fails on a non-zero exit."""
    res = subprocess.run(
        [sys.executable, str(SCRIPT), str(model), str(out), *args],
        env=vllm_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-6000:]
    data = json.loads(out.read_text())
    data["log"] = log
    return data


def assert_same_logprobs(fh: Mapping[str, Any], dense: Mapping[str, Any]) -> None:
    """The logprobs requests of two runs chose the same tokens with the same top logprobs."""
    assert fh["logprob_ids"] == dense["logprob_ids"]
    for steps_a, steps_b in zip(fh["logprobs"], dense["logprobs"]):
        for a, b in zip(steps_a, steps_b):
            assert a.keys() == b.keys()
            for tok in a:
                assert a[tok] == pytest.approx(b[tok], abs=1e-4)
