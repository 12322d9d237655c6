"""Speculative decoding (n-gram, draft model, EAGLE) on `vllm serve`: FlashHead serves the
verification rows, the drafts of a draft model that is itself a FlashHead model, and the drafts
of an EAGLE head that shares the target's lm_head.

Seven tiny-Llama servers in fp32 (exact comparisons): the dense reference without speculation, an
all-clusters FlashHead model with n-gram speculation and with a FlashHead draft model (the
one-sixteenth copy: its drafts are FlashHead's and sometimes rejected), and a
one-sixteenth-of-the-clusters FlashHead model without speculation, with n-gram speculation,
with the plain model as its draft (scored dense, which the log says once) and with a one-layer
EAGLE drafter built here (random weights; vLLM gives it the target's lm_head). On a release whose patchset does not map verification rows
(support.spec_decode: dense) the model is served dense under speculation, and the log says so. Greedy acceptance is "draft == FlashHead's argmax", so
speculation must change no greedy token; the sampled path is covered by the seeded repeats and
by the argument in docs/DESIGN.md ("Speculative decoding").
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest
from helpers.server import VllmServer, run_concurrently, start_all

from e2e._log_lines import NEVER_DENSE, assert_flashhead_path_only
from e2e._models import eagle_drafter

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.vllm, pytest.mark.main_release]

NGRAM = json.dumps(
    {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 2}
)
FP32 = ("--dtype", "float32")
# Inputs whose continuations repeat them: n-gram drafts then get accepted.
PROMPTS = [
    "one two three four one two three four one two three four one two",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add(",
    "red green blue red green blue red green blue red green",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
]
N_TOKENS = 32
SPEC_LINE = "FlashHead: speculative decoding verification rows of"
DRAFT_LINE = "served by FlashHead (p="
DRAFT_DENSE_LINE = "scored dense: the drafter's head is not a FlashHead model's"


def _draft_model(path: Path) -> str:
    return json.dumps({"method": "draft_model", "model": str(path), "num_speculative_tokens": 3})


DENSE_LINE = "served dense: speculative decoding"


def _serves_drafts() -> bool:
    """Whether this vLLM's patchset maps verification rows (support.spec_decode: flashhead);
    elsewhere a FlashHead model under speculation is served dense and must say so."""
    from flashhead.compat.version import detect_vllm_version
    from flashhead.registry import load_patchsets, select_patchset

    version = detect_vllm_version()
    if not version.present:  # no vLLM here: these tests are skipped (tests/conftest.py)
        return False
    patchset = select_patchset(load_patchsets().patchsets, version.release_for_matching)
    return patchset is not None and patchset.support.get("spec_decode") == "flashhead"


SERVES_DRAFTS = _serves_drafts()


def _eagle(path: Path) -> str:
    return json.dumps({"method": "eagle", "model": str(path), "num_speculative_tokens": 3})


@pytest.fixture(scope="module")
def spec_servers(tiny_models, e2e_logs, tmp_path_factory):
    all_clusters, sixteenth = tiny_models["llama-fh-all"], tiny_models["llama-fh"]
    eagle = eagle_drafter(sixteenth, tmp_path_factory.mktemp("eagle") / "eagle")
    servers = {
        "dense": VllmServer(
            all_clusters, e2e_logs / "spec-dense.log", env={"FLASHHEAD_ENABLED": "0"}, args=FP32
        ),
        "all-spec": VllmServer(
            all_clusters,
            e2e_logs / "spec-all.log",
            env=NEVER_DENSE,
            args=(*FP32, "--speculative-config", NGRAM),
        ),
        "one": VllmServer(sixteenth, e2e_logs / "spec-one-plain.log", args=FP32),
        "one-spec": VllmServer(
            sixteenth, e2e_logs / "spec-one.log", args=(*FP32, "--speculative-config", NGRAM)
        ),
        "all-draft": VllmServer(
            all_clusters,
            e2e_logs / "spec-all-draft.log",
            env=NEVER_DENSE,
            args=(*FP32, "--speculative-config", _draft_model(sixteenth)),
        ),
        "one-draft": VllmServer(
            sixteenth,
            e2e_logs / "spec-one-draft.log",
            args=(*FP32, "--speculative-config", _draft_model(tiny_models["llama-base"])),
        ),
        "one-eagle": VllmServer(
            sixteenth,
            e2e_logs / "spec-one-eagle.log",
            args=(*FP32, "--speculative-config", _eagle(eagle)),
        ),
    }
    start_all(list(servers.values()))
    yield servers
    for server in servers.values():
        server.stop()


def _one_at_a_time(server: VllmServer) -> list[list[int]]:
    # One request at a time: equal batch shapes on every server.
    return [server.greedy_ids([p], N_TOKENS)[0] for p in PROMPTS]


def _accepted_drafts(server: VllmServer) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    found = re.findall(r"^vllm:spec_decode_num_accepted_tokens_total\{[^}]*\} (\S+)$", text, re.M)
    assert found, "vllm:spec_decode_num_accepted_tokens_total is not on /metrics"
    return sum(float(v) for v in found)


def test_all_clusters_with_speculation_equal_dense_without(spec_servers):
    got = _one_at_a_time(spec_servers["all-spec"])
    assert got == _one_at_a_time(spec_servers["dense"])
    log = spec_servers["all-spec"].log()
    assert _accepted_drafts(spec_servers["all-spec"]) > 0
    if SERVES_DRAFTS:  # the verification rows themselves were FlashHead's
        assert_flashhead_path_only(log)
        assert SPEC_LINE in log, log[-3000:]
        assert DENSE_LINE not in log
    else:  # dense, and the log says why, once
        assert log.count(DENSE_LINE) == 1, log[-3000:]


def test_one_probe_with_speculation_equals_itself_without_and_differs_from_dense(spec_servers):
    with_drafts = _one_at_a_time(spec_servers["one-spec"])
    dense = _one_at_a_time(spec_servers["dense"])
    assert _accepted_drafts(spec_servers["one-spec"]) > 0
    if not SERVES_DRAFTS:
        assert with_drafts == dense
        return
    assert with_drafts == _one_at_a_time(spec_servers["one"])
    assert with_drafts != dense
    assert SPEC_LINE in spec_servers["one-spec"].log()


def test_flashhead_draft_model_with_all_clusters_equals_dense_without(spec_servers):
    server = spec_servers["all-draft"]
    assert _one_at_a_time(server) == _one_at_a_time(spec_servers["dense"])
    assert _accepted_drafts(server) > 0
    log = server.log()
    if SERVES_DRAFTS:
        assert_flashhead_path_only(log)
        assert SPEC_LINE in log, log[-3000:]
        # The draft model is a FlashHead model: its own assets score its drafts.
        draft = str(spec_servers["one"].model)
        assert f"draft tokens of {draft} {DRAFT_LINE}" in log, log[-3000:]
    else:
        assert log.count(DENSE_LINE) == 1, log[-3000:]


def test_one_probe_with_a_plain_draft_model_equals_itself_without(spec_servers):
    server = spec_servers["one-draft"]
    got = _one_at_a_time(server)
    assert _accepted_drafts(server) > 0
    if not SERVES_DRAFTS:
        assert got == _one_at_a_time(spec_servers["dense"])
        return
    assert got == _one_at_a_time(spec_servers["one"])
    assert got != _one_at_a_time(spec_servers["dense"])
    log = server.log()
    assert SPEC_LINE in log
    assert log.count(DRAFT_DENSE_LINE) == 1, log[-3000:]  # the plain draft: dense, said once


def test_one_probe_with_an_eagle_drafter_equals_itself_without(spec_servers):
    server = spec_servers["one-eagle"]
    got = _one_at_a_time(server)
    if not SERVES_DRAFTS:
        assert got == _one_at_a_time(spec_servers["dense"])
        return
    assert got == _one_at_a_time(spec_servers["one"])
    log = server.log()
    assert SPEC_LINE in log, log[-3000:]
    # The drafter holds no lm_head: vLLM shares the target's, so its drafts are scored by the
    # target's own FlashHead (the same index, checked against that very weight).
    assert f"draft tokens of {server.model} {DRAFT_LINE}" in log, log[-3000:]
    assert "does not share the first one's lm_head weight" not in log


def test_seeded_sampling_under_speculation_repeats(spec_servers):
    # n-gram only: under a draft model, seeded sampling did not repeat on vLLM 0.27.1 even dense
    # (FLASHHEAD_ENABLED=0, three runs, three texts), and on 0.32.0 it repeated in one module run
    # and not in the next; until that is explained it cannot tell FlashHead from vLLM.
    server = spec_servers["one-spec"]

    def sample(prompt: str, **params) -> list[int]:
        body = {"max_tokens": N_TOKENS, "ignore_eos": True, **params}
        return list(server.complete(prompt, **body)["choices"][0]["token_ids"])

    seeded = [sample(p, temperature=0.8, seed=11) for p in PROMPTS]
    assert [sample(p, temperature=0.8, seed=11) for p in PROMPTS] == seeded
    greedy = [sample(p, temperature=0.0) for p in PROMPTS]
    hot = [sample(p, temperature=1.0, seed=3) for p in PROMPTS]
    assert hot != greedy


@pytest.mark.parametrize("name", ["one-spec", "one-draft"])
def test_mixed_requests_under_speculation_are_valid(spec_servers, name):
    server = spec_servers[name]
    vocab = json.loads((Path(server.model) / "config.json").read_text())["vocab_size"]

    def request(i: int) -> dict:
        prompt = PROMPTS[i % len(PROMPTS)]
        kind = i % 4
        params: dict = {"max_tokens": 16}
        if kind == 0:
            params.update(temperature=0.0)
        elif kind == 1:
            params.update(temperature=0.9, seed=i)
        elif kind == 2:
            params.update(temperature=0.0, logprobs=2)
        else:
            params.update(temperature=0.7, top_p=0.9, stop=["\n"])
        return {"kind": kind, "choice": server.complete(prompt, **params)["choices"][0]}

    results = run_concurrently([lambda i=i: request(i) for i in range(32)])
    for r in results:
        ids = r["choice"]["token_ids"]
        assert ids and all(0 <= t < vocab for t in ids), r
        if r["kind"] == 2:
            assert len(r["choice"]["logprobs"]["top_logprobs"]) == len(ids), r
        if r["kind"] == 3:
            assert "\n" not in r["choice"]["text"], r
