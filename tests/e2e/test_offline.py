"""Offline ``vllm.LLM(...)`` with FlashHead models (tiny Llama and Qwen3 built here), each run in
a subprocess with its script under ``if __name__ == "__main__":`` (vLLM spawns processes).
Also: a FlashHead model refuses to load without the plugin, and a plain model with the plugin
loaded answers as FlashHead probing every cluster (the kill switch FLASHHEAD_ENABLED=0 is
checked by test_serve's dense server)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers.server import vllm_env

from e2e._log_lines import NEVER_DENSE, SERVING_LINE, assert_flashhead_path_only
from e2e._offline import SCRIPT, assert_same_logprobs, run_offline

# The figure a server timed at its first step (flashhead/crossover.py), and its trials.
TIMED = re.compile(
    r"timed against the server's dense head at start-up: (?:batches of (\d+) rows or more go "
    r"to the dense head|FlashHead was faster at every batch tried)[^\n]*"
)
TRIAL = re.compile(r"(\d+) rows [\d.]+ vs [\d.]+ ms")
PATH = re.compile(r"served \(path: ([\w-]+)\)")
# The plugin's start-up line ("[flashhead] flashhead X.Y: vLLM ..., process ..."): it loaded.
PLUGIN_STARTED = re.compile(r"\[flashhead\] flashhead \d")

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.vllm, pytest.mark.main_release]


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("offline")
    results = {}
    for kind in ("llama", "qwen3"):
        results[f"{kind}-all"] = run_offline(
            tiny_models[f"{kind}-fh-all"], out / f"{kind}-all.json", NEVER_DENSE
        )
        # The dense references are the plain models (the FlashHead folders hold their weights)
        # with the plugin loaded: FlashHead must leave a plain model alone. They run in one
        # process (faster start); FlashHead runs use vLLM's default multiprocess layout
        # (API/engine/worker), like a user's script.
        results[f"{kind}-dense"] = run_offline(
            tiny_models[f"{kind}-base"],
            out / f"{kind}-dense.json",
            {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        )
    results["llama-default"] = run_offline(tiny_models["llama-fh"], out / "llama-default.json")
    # FLASHHEAD_DENSE_MIN_BATCH unset (the tests pin it): the worker times the dense head.
    results["llama-measured"] = run_offline(
        tiny_models["llama-fh"], out / "llama-measured.json", {"FLASHHEAD_DENSE_MIN_BATCH": ""}
    )
    # The shadow guard at 1/16 of the clusters: 4 x 40 warm-up greedy rows, of which the guard
    # judges the first 128 and falls back; everything after is dense.
    results["llama-guard"] = run_offline(
        tiny_models["llama-fh"],
        out / "llama-guard.json",
        {"FLASHHEAD_SHADOW": "1", "FLASHHEAD_SHADOW_MIN_AGREEMENT": "0.99"},
        ["--warmup-tokens", "40"],
    )
    return results


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_all_clusters_equals_dense(runs, kind):
    fh, dense = runs[f"{kind}-all"], runs[f"{kind}-dense"]
    assert_flashhead_path_only(fh["log"])
    assert PLUGIN_STARTED.search(dense["log"]), dense["log"][-3000:]
    assert SERVING_LINE not in dense["log"]
    assert fh["greedy"] == dense["greedy"]
    # FlashHead leaves vLLM's sampling stream alone: at all clusters seeded sampling is the dense
    # result too (temperature, top-k, top-p applied by vLLM over identical logits).
    assert fh["seeded"] == dense["seeded"]


@pytest.mark.parametrize("kind", ["llama-all", "llama-default", "qwen3-all"])
def test_seeded_sampling_repeats(runs, kind):
    assert runs[kind]["seeded"] == runs[kind]["seeded_again"]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_logprobs_rows_are_dense(runs, kind):
    assert_same_logprobs(runs[f"{kind}-all"], runs[f"{kind}-dense"])


def test_default_probes_differ_from_all_clusters_somewhere(runs):
    # A tiny random-weight head: probing 1/16 of the clusters must change some greedy token,
    # else the default-probe run would not be exercising FlashHead's retrieval at all.
    assert runs["llama-default"]["greedy"] != runs["llama-all"]["greedy"]
    assert SERVING_LINE in runs["llama-default"]["log"]


def test_shadow_guard_falls_back_to_dense(runs):
    guard, dense = runs["llama-guard"], runs["llama-dense"]
    assert "served dense from now on: shadow guard" in guard["log"]
    counters = guard["flashhead_metrics"]
    assert set(counters["fallback"].values()) == {1}
    rows = {(path, reason): n for _, path, reason, n in counters["rows"]}
    assert rows[("dense", "guard")] > 0 and rows[("flashhead", "")] >= 128
    shadow_rows, agree, _ = next(iter(counters["shadow"].values()))
    assert agree / shadow_rows < 0.99
    # After the fall back the model answers as dense, sampled requests included.
    assert guard["greedy"] == dense["greedy"]
    assert guard["seeded"] == dense["seeded"]


def test_refuses_to_load_without_plugin(tiny_models, tmp_path):
    res = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_models["llama-fh"]), str(tmp_path / "x.json")],
        env=vllm_env({"VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = res.stdout + res.stderr
    assert res.returncode != 0
    assert "FlashHeadLlamaForCausalLM" in log and "not supported" in log.lower(), log[-3000:]


def test_an_unpinned_run_times_the_dense_head_and_routes_by_the_figure(runs):
    run, dense = runs["llama-measured"], runs["llama-dense"]
    log = run["log"]
    timed = TIMED.search(log)
    assert timed, log[-3000:]
    # _offline_run.py serves at most 4 sequences: no trial of more rows than a step can have.
    assert 1 <= max(int(n) for n in TRIAL.findall(timed.group(0))) <= 4, timed.group(0)
    paths = set(PATH.findall(log))
    dense_from = int(timed.group(1)) if timed.group(1) else None
    # Its greedy batches hold the 4 prompts: at or past the figure they are dense.
    if dense_from is None:
        assert paths == {"flashhead"}, (timed.group(0), paths)
    elif dense_from == 1:
        assert paths == {"dense-by-dispatcher"}, (timed.group(0), paths)
        assert run["greedy"] == dense["greedy"]  # every row from vLLM's own head
    else:
        assert "dense-by-dispatcher" in paths, (timed.group(0), paths)
    assert all(ids for ids in run["greedy"])
