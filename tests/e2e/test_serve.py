"""`vllm serve` with FlashHead models, end to end (V1 model runner, CPU).

Servers are shared: a dense reference (FLASHHEAD_ENABLED=0 on the same FlashHead folder) for the
module, a FlashHead server at the default probes for the first class, an all-clusters FlashHead
server next to a second FlashHead model (a tiny Llama) for the second. At most three run at once.
The second class's two servers run the shadow check on every greedy row (FLASHHEAD_SHADOW=1):
their outputs must not change, and their /metrics must keep apart.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from helpers.server import (
    VllmServer,
    common_prefix_lengths,
    free_port,
    run_concurrently,
    start_all,
)

from e2e._log_lines import NEVER_DENSE, SERVING_LINE, assert_flashhead_path_only
from e2e._models import with_probes
from flashhead.server_report import parse_reports

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.vllm, pytest.mark.main_release]

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea:",
    "def fibonacci(n):",
    "The three primary colors are",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time, in a small village,",
    "The best way to learn a new language is",
    "List three uses of copper:",
]
# Of 20 held-out questions, asked one at a time. The default conversion (int4 rows, p=512)
# answered all 20 as dense does here (2026-12-07, AVX2, bf16) and 60/60 offline; the floor leaves
# room for vLLM's own bf16 batch effects (docs/convert.md).
ANSWER_FLOOR = 18

LONG_PROMPT = " ".join(
    ["The history of the city goes back many centuries, and its people tell stories of it."] * 22
)


@pytest.fixture(scope="module")
def dense_server(smollm2_fh, e2e_logs):
    server = VllmServer(smollm2_fh, e2e_logs / "dense.log", env={"FLASHHEAD_ENABLED": "0"})
    server.start()
    yield server
    server.stop()


# The FlashHead path scores candidates with a per-row bf16 GEMV, the dense head with one bf16
# GEMM: both round their logits to bf16 after different accumulation orders, so a near-tie at
# the top can go either way. Two bf16 steps of a logit below 32 (SmolLM2's range).
BF16_TIE_LOGPROB = 0.25


def assert_greedy_equals_dense(
    got: list[list[int]], ref: list[list[int]], prompts: list[str], dense: VllmServer
) -> None:
    """Greedy ids equal the dense server's, except where the two part at a bf16 near-tie: there
    the dense server (logprobs are served dense) must rank both tokens within BF16_TIE_LOGPROB."""
    assert len(got) == len(ref) == len(prompts)
    for prompt, a, b in zip(prompts, got, ref):
        assert len(a) == len(b), (prompt, a, b)
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        if k == len(a):
            continue
        context = dense.post("/tokenize", {"prompt": prompt})["tokens"] + b[:k]
        step = dense.complete(
            context, max_tokens=1, temperature=0.0, logprobs=5, return_tokens_as_token_ids=True
        )["choices"][0]["logprobs"]["top_logprobs"][0]
        ranked = {int(key.split(":")[-1]): lp for key, lp in step.items()}
        assert a[k] in ranked and b[k] in ranked, (prompt, k, a[k], b[k], ranked)
        gap = abs(ranked[a[k]] - ranked[b[k]])
        assert gap <= BF16_TIE_LOGPROB, (prompt, k, a[k], b[k], ranked)
        print(f"\n{prompt!r}: parts from dense at token {k} on a near-tie ({gap:.3f})")


def _vocab(model_dir) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


@pytest.fixture(scope="class")
def default_probe_servers(smollm2_fh, dense_server, e2e_logs):
    fh = VllmServer(smollm2_fh, e2e_logs / "flashhead.log", served_name="smollm2-fh")
    fh.start()
    try:  # both start side by side: the dense server has been starting meanwhile
        dense_server.wait_ready()
        fh.wait_ready()
        yield fh, dense_server
    finally:
        fh.stop()


class TestDefaultProbes:
    def test_flashhead_serves_decode_steps(self, default_probe_servers):
        fh, dense = default_probe_servers
        fh.complete(PROMPTS[0], max_tokens=4, temperature=0.0)
        dense.complete(PROMPTS[0], max_tokens=4, temperature=0.0)
        assert SERVING_LINE in fh.log(), fh.tail()
        # FLASHHEAD_ENABLED=0: the plugin still loads the FlashHead architecture, serves dense.
        assert "flashhead" in dense.log() and SERVING_LINE not in dense.log(), dense.tail()

    def test_greedy_agreement_at_default_probes(self, default_probe_servers, smollm2_fh):
        fh, dense = default_probe_servers
        n_tokens = 32
        got = fh.greedy_ids(PROMPTS, n_tokens)
        ref = dense.greedy_ids(PROMPTS, n_tokens)
        prefix = common_prefix_lengths(got, ref)
        same_tokens = sum(x == y for a, b in zip(got, ref) for x, y in zip(a, b))
        cfg = json.loads((smollm2_fh / "config.json").read_text())
        print(
            f"\nSmolLM2 greedy agreement at n_probes={cfg['n_probes']}/{cfg['n_clusters']}: "
            f"first token {sum(p > 0 for p in prefix)}/{len(PROMPTS)}, "
            f"identical completions {sum(p == n_tokens for p in prefix)}/{len(PROMPTS)}, "
            f"mean common prefix {sum(prefix) / len(prefix):.1f}/{n_tokens} tokens, "
            f"position-wise {same_tokens}/{n_tokens * len(PROMPTS)}"
        )
        # The retrieval must find the dense argmax on most first steps of a real model, and keep
        # most 32-token completions whole: at ~99.8% per-step agreement ~7.5 of 8 are expected
        # (measured 8/8 at p=288; the prose-only calibration of the first release gave 3/8).
        assert sum(p > 0 for p in prefix) >= len(PROMPTS) - 1
        assert sum(p == n_tokens for p in prefix) >= 5

    def test_held_out_questions_answered_as_dense(self, default_probe_servers, smollm2_fh):
        """Issue 10's user-level check: greedy chat answers to held-out questions (never used by
        convert), 48 tokens each, FlashHead at the served n_probes against dense.

        One request at a time on each server: on a bf16 CPU model the dense server's own answers
        depend on what else shares the batch (measured: 11 of these 20 answers identical between
        one-at-a-time and 20 concurrent requests, FlashHead off), so only equal batch shapes
        compare the heads and not the batching."""
        from flashhead.calibration.chat import questions

        fh, dense = default_probe_servers
        asked = questions()[:20]

        def answers(server: VllmServer) -> list[str]:
            def one(q: str) -> str:
                r = server.post(
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": q}], "max_tokens": 48,
                     "temperature": 0.0},
                )  # fmt: skip
                return r["choices"][0]["message"]["content"]

            return [one(q) for q in asked]

        got, ref = run_concurrently([lambda: answers(fh), lambda: answers(dense)])
        differing = [(q, a, b) for q, a, b in zip(asked, got, ref) if a != b]
        n_probes = json.loads((smollm2_fh / "config.json").read_text())["n_probes"]
        print(f"\nSmolLM2 held-out questions at n_probes={n_probes}: "
              f"{len(asked) - len(differing)}/{len(asked)} answers identical to dense")  # fmt: skip
        for q, a, b in differing:
            print(f"  {q}\n    FlashHead: {a[:120]!r}\n    dense:     {b[:120]!r}")
        # Floor measured when written (see docs/convert.md); issue 10's target is 19/20.
        assert len(asked) - len(differing) >= ANSWER_FLOOR

    def test_a_request_can_ask_for_the_shadow_check(self, default_probe_servers):
        fh, _ = default_probe_servers  # FLASHHEAD_SHADOW unset: no row is shadowed by share

        def shadow_and_flash_rows() -> tuple[int, int]:
            reports = _flashhead_metrics(fh).values()
            return (
                sum(r.shadow_rows for r in reports),
                sum(r.rows.get("flashhead", 0) for r in reports),
            )

        def settled(flash_at_least: int) -> tuple[int, int]:
            # The workers write their counters every 0.25 s: wait for the rows, then for two
            # readings 0.6 s apart to agree (a call's rows and shadow rows may land apart).
            last = shadow_and_flash_rows()
            for _ in range(30):
                time.sleep(0.6)
                now = shadow_and_flash_rows()
                if now == last and now[1] >= flash_at_least:
                    return now
                last = now
            return last

        fh.complete(PROMPTS[0], max_tokens=2, temperature=0.0)  # counters exist from here on
        before = settled(0)
        fh.complete(PROMPTS[1], max_tokens=10, temperature=0.0, vllm_xargs={"flashhead_shadow": 1})
        asked = settled(before[1] + 9)
        shadowed, served = asked[0] - before[0], asked[1] - before[1]
        assert 9 <= served <= 10 and shadowed == served, (before, asked)  # all its rows
        fh.complete(PROMPTS[2], max_tokens=10, temperature=0.0)
        plain = settled(asked[1] + 9)
        assert plain[0] == asked[0] and plain[1] >= asked[1] + 9, (asked, plain)

    def test_logprobs_requests_are_served_dense(self, default_probe_servers):
        fh, dense = default_probe_servers
        for prompt in PROMPTS[:3]:
            a = fh.complete(prompt, max_tokens=6, temperature=0.0, logprobs=3)["choices"][0]
            b = dense.complete(prompt, max_tokens=6, temperature=0.0, logprobs=3)["choices"][0]
            assert a["token_ids"] == b["token_ids"]
            for la, lb in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
                assert la.keys() == lb.keys()
                for tok in la:
                    assert la[tok] == pytest.approx(lb[tok], abs=2e-3)

    def test_dense_row_features_match_dense(self, default_probe_servers):
        """logit_bias, allowed_token_ids, bad_words and structured output rows are served by
        vLLM's own logits: token for token what the dense server returns."""
        fh, dense = default_probe_servers
        forced = dense.complete(PROMPTS[0], max_tokens=1, temperature=0.0)["choices"][0]
        allowed = [int(forced["token_ids"][0]), 13, 1000, 2000]
        cases = [
            dict(logit_bias={"1000": 100.0}),
            dict(allowed_token_ids=allowed),
            dict(bad_words=[" Paris", " the"]),
            dict(structured_outputs={"choice": ["yes", "no", "maybe"]}),
        ]
        for extra in cases:
            a = fh.complete(PROMPTS[0], max_tokens=6, temperature=0.0, **extra)["choices"][0]
            b = dense.complete(PROMPTS[0], max_tokens=6, temperature=0.0, **extra)["choices"][0]
            assert a["token_ids"] == b["token_ids"], extra
        assert a["text"] in ("yes", "no", "maybe")

    def test_prompt_logprobs_are_exact(self, default_probe_servers):
        fh, dense = default_probe_servers
        a = fh.complete(PROMPTS[1], max_tokens=1, temperature=0.0, prompt_logprobs=2)
        b = dense.complete(PROMPTS[1], max_tokens=1, temperature=0.0, prompt_logprobs=2)
        pa, pb = a["choices"][0]["prompt_logprobs"], b["choices"][0]["prompt_logprobs"]
        assert len(pa) == len(pb) > 1
        for sa, sb in zip(pa[1:], pb[1:]):  # position 0 has no logprobs
            assert sa.keys() == sb.keys()
            for tok in sa:
                assert sa[tok]["logprob"] == pytest.approx(sb[tok]["logprob"], abs=2e-3)

    def test_mixed_load_32_concurrent(self, default_probe_servers, smollm2_fh):
        fh, _ = default_probe_servers
        vocab = _vocab(smollm2_fh)
        seeded = dict(temperature=0.8, top_p=0.9, top_k=40)
        calls, checks = [], []

        def add(kind, fn):
            calls.append(fn)
            checks.append(kind)

        for p in PROMPTS:
            add("greedy", lambda p=p: fh.complete(p, max_tokens=16, temperature=0.0))
        for i in range(6):
            add(
                "seeded",
                lambda i=i: fh.complete(PROMPTS[i], max_tokens=16, seed=100 + i, **seeded),
            )
        for i in range(4):
            add(
                "penalties",
                lambda i=i: fh.complete(
                    PROMPTS[i],
                    max_tokens=16,
                    temperature=0.9,
                    min_p=0.05,
                    presence_penalty=0.5,
                    frequency_penalty=0.3,
                    repetition_penalty=1.1,
                ),
            )
        for i in range(4):
            add("logprobs", lambda i=i: fh.complete(PROMPTS[i], max_tokens=8, logprobs=2))
        for i in range(3):
            add(
                "stop",
                lambda i=i: fh.complete(
                    PROMPTS[4 + i], max_tokens=32, temperature=0.0, stop=["\n", "."]
                ),
            )
        for i in range(3):
            add("one", lambda i=i: fh.complete(PROMPTS[i], max_tokens=1, temperature=0.7))
        for i in range(2):
            add(
                "long",
                lambda i=i: fh.complete(f"{LONG_PROMPT} ({i})", max_tokens=8, temperature=0.0),
            )
        for i in range(2):
            add(
                "chat",
                lambda i=i: fh.post(
                    "/v1/chat/completions",
                    {
                        "messages": [{"role": "user", "content": PROMPTS[i]}],
                        "max_tokens": 16,
                        "temperature": 0.0,
                    },
                ),
            )
        assert len(calls) == 32
        results = run_concurrently(calls)

        for kind, res in zip(checks, results):
            choice = res["choices"][0]
            assert choice["finish_reason"] in ("stop", "length"), (kind, choice)
            if kind == "chat":
                assert isinstance(choice["message"]["content"], str)
                assert choice["message"]["content"].strip(), (kind, choice)
                continue
            ids = choice["token_ids"]
            assert ids and all(0 <= t < vocab for t in ids), (kind, ids)
            assert isinstance(choice["text"], str)
            if kind == "one":
                assert len(ids) == 1
            if kind == "logprobs":
                assert len(choice["logprobs"]["top_logprobs"]) == len(ids)
            if kind == "stop":
                assert "\n" not in choice["text"] and "." not in choice["text"], choice

        # Seeded requests repeat exactly. One at a time: vLLM itself (dense, 0.27.1 CPU) does not
        # reproduce a seeded request across different batch mixes, so only an identical batch
        # (here: alone) is a fair test of FlashHead's own seeded noise.
        def seeded_round():
            return [
                fh.complete(PROMPTS[i], max_tokens=16, seed=100 + i, **seeded)["choices"][0][
                    "token_ids"
                ]
                for i in range(6)
            ]

        first = seeded_round()
        assert seeded_round() == first


def _flashhead_metrics(server: VllmServer) -> dict:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
        return parse_reports(r.read().decode())


def _rows(server: VllmServer, key: str) -> int:
    return sum(r.rows.get(key, 0) for r in _flashhead_metrics(server).values())


@pytest.fixture(scope="class")
def two_servers(smollm2_fh, tiny_models, dense_server, e2e_logs, tmp_path_factory):
    all_probes = with_probes(smollm2_fh, tmp_path_factory.mktemp("m") / "smollm2-all", None)
    shadow = {"FLASHHEAD_SHADOW": "1"}
    a = VllmServer(
        all_probes,
        e2e_logs / "smollm2-all.log",
        served_name="smollm2-all",
        env={**NEVER_DENSE, **shadow},
    )
    b = VllmServer(
        tiny_models["llama-fh"], e2e_logs / "tiny.log", served_name="tiny-llama", env=shadow
    )
    start_all([a, b])
    dense_server.wait_ready()
    yield a, b, dense_server
    a.stop()
    b.stop()


class TestTwoServers:
    def test_all_clusters_greedy_equals_dense(self, two_servers):
        all_probes, _, dense = two_servers
        got = all_probes.greedy_ids(PROMPTS, 32)
        ref = dense.greedy_ids(PROMPTS, 32)
        assert_greedy_equals_dense(got, ref, PROMPTS, dense)
        assert_flashhead_path_only(all_probes.log())

    def test_each_server_answers_with_its_own_model(self, two_servers, tiny_models):
        smol, tiny, dense = two_servers
        prompts = PROMPTS[:4]
        results = run_concurrently(
            [lambda p=p: smol.greedy_ids([p], 12)[0] for p in prompts]
            + [lambda p=p: tiny.greedy_ids([p], 12)[0] for p in prompts]
        )
        smol_ids, tiny_ids = results[:4], results[4:]
        assert_greedy_equals_dense(smol_ids, dense.greedy_ids(prompts, 12), prompts, dense)
        assert tiny_ids == tiny.greedy_ids(prompts, 12)  # deterministic on its own
        assert tiny_ids != smol_ids
        assert all(t < _vocab(tiny_models["llama-fh"]) for ids in tiny_ids for t in ids)
        assert f"{SERVING_LINE} {smol.model}" in smol.log()
        assert f"{SERVING_LINE} {tiny.model}" in tiny.log()

    # FlashHead's counters on the two shadowed servers' /metrics (flashhead.metrics).
    def test_rows_grow_with_requests_and_keep_apart(self, two_servers):
        smol, tiny, _ = two_servers
        smol.greedy_ids(PROMPTS[:1], 8)  # at least one step on each before the first reading
        tiny.greedy_ids(PROMPTS[:1], 8)
        before = _rows(smol, "flashhead")
        smol.greedy_ids(PROMPTS[:2], 10)
        # The workers write every 0.25 s: a scrape may trail the last step by that much.
        for _ in range(40):
            after = _rows(smol, "flashhead")
            if after >= before + 20:
                break
            time.sleep(0.1)
        assert after >= before + 20  # 2 requests x 10 tokens, each a FlashHead row
        assert set(_flashhead_metrics(smol)) == {"smollm2-all"}  # vLLM's model_name label
        assert set(_flashhead_metrics(tiny)) == {"tiny-llama"}

    def test_logprobs_rows_are_counted_dense(self, two_servers):
        smol, _, _ = two_servers
        before = _rows(smol, "dense:logprobs")
        smol.complete(PROMPTS[0], max_tokens=5, temperature=0.0, logprobs=2)
        for _ in range(40):
            if _rows(smol, "dense:logprobs") >= before + 5:
                break
            time.sleep(0.1)
        assert _rows(smol, "dense:logprobs") == before + 5

    def test_shadow_agreement_all_clusters_vs_one_sixteenth(self, two_servers):
        smol, tiny, _ = two_servers
        smol.greedy_ids(PROMPTS, 16)
        tiny.greedy_ids(PROMPTS, 16)
        time.sleep(0.6)
        (all_clusters,) = _flashhead_metrics(smol).values()
        (sixteenth,) = _flashhead_metrics(tiny).values()
        assert all_clusters.shadow_rows >= 128 and sixteenth.shadow_rows >= 128
        assert all_clusters.agreement >= 0.99  # bf16 ties may part a row or two
        assert sixteenth.agreement < 0.99  # random weights: 1/16 of the clusters must miss
        assert not all_clusters.fallback_active and not sixteenth.fallback_active

    def test_doctor_url_reads_the_server_and_names_a_dead_one(self, two_servers):
        smol, _, _ = two_servers
        smol.greedy_ids(PROMPTS[:1], 4)
        time.sleep(0.6)

        def doctor(url):
            return subprocess.run(
                [smol.python, "-m", "flashhead.cli", "doctor", "--url", url, "--json"],
                capture_output=True,
                text=True,
                timeout=120,
            )

        res = doctor(smol.url)
        assert res.returncode == 0, res.stdout + res.stderr
        (model,) = json.loads(res.stdout)["models"]
        assert model["model_name"] == "smollm2-all" and model["rows"]["flashhead"] > 0
        assert model["agreement"] >= 0.99
        dead = doctor(f"http://127.0.0.1:{free_port()}")
        assert dead.returncode == 1 and "cannot read" in json.loads(dead.stdout)["error"]
