"""Pipeline parallel (PP=2) on `vllm serve`: the head lives on the last stage, and FlashHead
serves it there with the single-rank head; the first stage builds no FlashHead state.

vLLM's CPU backend runs PP only with its compiled warm-up: in eager mode (`--enforce-eager`) the
CPU runner skips `_dummy_run`, so the second stage never allocates its intermediate tensors and
fails at the first request (an AssertionError in `sync_and_gather_intermediate_tensors`, also
without the plugin, on 0.27.1 and 0.32.0). These servers therefore run compiled.

Three tiny-Llama servers in fp32 at --pipeline-parallel-size 2, one core per stage: the dense
reference (FLASHHEAD_ENABLED=0), the default conversion probing every token (must equal it token
for token), and the centroid model probing one sixteenth of its clusters (must differ, served by
the last stage only). Compared against PP=2 dense, as the TP tests compare against TP=2 dense.
"""

from __future__ import annotations

import re

import pytest
from helpers.server import VllmServer, start_all

from e2e._log_lines import NEVER_DENSE, assert_flashhead_path_only
from e2e._mixed_load import assert_seeded_repeats_and_mixed_load_valid

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.vllm, pytest.mark.parallel]

PP2 = ("--dtype", "float32", "--pipeline-parallel-size", "2")
ONE_CORE_EACH = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
PROMPTS = [
    "one two three four one two three four",
    "def add(a, b):\n    return a + b\n\ndef",
    "The capital of France is",
    "Once upon a time there",
]
N_TOKENS = 20
FLASHHEAD_LINE = re.compile(r"\((\w+) pid=\d+\) INFO [^\n]*FlashHead: ")


def _compiled(server: VllmServer) -> VllmServer:
    server.args = [a for a in server.args if a != "--enforce-eager"]
    return server


@pytest.fixture(scope="module")
def pp_servers(tiny_models, tiny_llama_int4_all, e2e_logs):
    all_clusters, sixteenth = tiny_llama_int4_all, tiny_models["llama-fh"]
    servers = {
        "dense": VllmServer(
            all_clusters,
            e2e_logs / "pp2-dense.log",
            env={**ONE_CORE_EACH, "FLASHHEAD_ENABLED": "0"},
            args=PP2,
        ),
        "all": VllmServer(
            all_clusters, e2e_logs / "pp2-all.log", env={**ONE_CORE_EACH, **NEVER_DENSE}, args=PP2
        ),
        "one": VllmServer(sixteenth, e2e_logs / "pp2-one.log", env=ONE_CORE_EACH, args=PP2),
    }
    start_all([_compiled(s) for s in servers.values()])
    yield servers
    for server in servers.values():
        server.stop()


def _greedy(server: VllmServer) -> list[list[int]]:
    return [server.greedy_ids([p], N_TOKENS)[0] for p in PROMPTS]


def _stages_with_flashhead_lines(log: str) -> set[str]:
    return set(FLASHHEAD_LINE.findall(log))


def test_all_clusters_equal_pp2_dense_token_for_token(pp_servers):
    dense = _greedy(pp_servers["dense"])
    assert _greedy(pp_servers["all"]) == dense
    log = pp_servers["all"].log()
    assert_flashhead_path_only(log)
    assert "stage 1: int4 head rows" in log, log[-3000:]
    # The last stage serves the head; the first holds none and says nothing.
    assert _stages_with_flashhead_lines(log) == {"Worker_PP1"}, log[-3000:]
    assert "served dense" not in log and "FlashHead: error" not in log, log[-3000:]


def test_one_sixteenth_differs_and_the_last_stage_serves_it(pp_servers):
    one = _greedy(pp_servers["one"])
    assert one != _greedy(pp_servers["dense"])
    log = pp_servers["one"].log()
    assert_flashhead_path_only(log)
    assert _stages_with_flashhead_lines(log) == {"Worker_PP1"}, log[-3000:]
    assert "served dense" not in log and "FlashHead: error" not in log, log[-3000:]


def test_seeded_sampling_repeats_and_mixed_load_is_valid(pp_servers):
    assert_seeded_repeats_and_mixed_load_valid(pp_servers["one"], PROMPTS, N_TOKENS, 16)
