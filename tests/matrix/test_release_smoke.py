"""One vLLM release at run time: the smoke every release of the matrix runs (issue 11).

The release is the one installed in ``$FLASHHEAD_TEST_PYTHON`` (default: this interpreter). Its
own transformers builds the tiny model (0.17 pins transformers < 5, which cannot read tokenizers
saved by transformers 5), its own flashhead converts it, its own ``vllm serve`` serves it. The
servers run in float32, where a greedy tie between two tokens is practically impossible, so
"equal" means token for token.

``scripts/matrix.sh X`` runs this for release X; scripts/test.sh runs it on 0.27.1 too. On 0.32.0
the full e2e suite checks all of it with more servers, and CI skips it there (marker matrix).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from e2e._log_lines import NEVER_DENSE, SERVING_LINE, assert_flashhead_path_only
from e2e._models import with_probes
from helpers.server import VllmServer, start_all

from flashhead.server_report import fetch_metrics_text, parse_reports

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.e2e, pytest.mark.matrix]

TESTS = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Point:", "for i in range(10):"]
N_TOKENS = 16
# The token a +100 logit_bias request forces (of 8000; about 1 in 500 is probed at one probe).
BIASED = 1000
SERVE = ("--dtype", "float32")
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _py(python: str, code: str, timeout: float = 600) -> str:
    res = subprocess.run(
        [python, "-c", code],
        env={**os.environ, **ENV, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, f"{python} -c ... failed:\n{res.stderr[-3000:]}"
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def release(test_python) -> dict:
    """What the release under test is and what flashhead means to do there (doctor --json)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHHEAD_")}
    proc = subprocess.run(
        [test_python, "-m", "flashhead.cli", "doctor", "--json"],
        env={**env, **ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    # vLLM may log to stdout before the report: the JSON starts at a line "{".
    start = re.search(r"^\{$", proc.stdout, re.M)
    assert start, f"doctor --json gave no JSON:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    report = json.loads(proc.stdout[start.start() :])
    report["returncode"] = proc.returncode
    report["stderr"] = proc.stderr
    return report


@pytest.fixture(scope="module")
def models(test_python, tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama (built by the release's own transformers) and its FlashHead conversions:
    every cluster probed (exact) and a single probe (must differ somewhere)."""
    cache = os.environ.get("FLASHHEAD_TEST_CACHE") or str(
        Path.home() / ".cache" / "flashhead" / "test-models"
    )
    base = _py(
        test_python,
        "import transformers\n"
        "from helpers.tiny_models import cached_tiny_model\n"
        f"print(cached_tiny_model({cache!r} + '/transformers-' + transformers.__version__,"
        " arch='llama', vocab_size=8000, hidden=128, layers=2, seed=0))",
    )
    root = tmp_path_factory.mktemp("matrix-models")
    converted = root / "converted"
    res = subprocess.run(
        [test_python, "-m", "flashhead.cli", "convert", base, str(converted), "--quiet",
         "--centroids", "mean", "--cluster-size", "16"],
        env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return {
        "plain": Path(base),
        "fh-all": with_probes(converted, root / "fh-all", None),
        "fh-1": with_probes(converted, root / "fh-1", 1),
    }


@pytest.fixture(scope="module")
def servers(models, test_python, tmp_path_factory):
    """Three servers of the release, started together with a FlashHead model served without the
    plugin (it must refuse). The machine is CPU-bound while they start, so one group costs no
    more than pairs, and saves their waits."""
    logs = tmp_path_factory.mktemp("matrix-logs")

    def server(name: str, model: str, env: dict | None = None) -> VllmServer:
        return VllmServer(models[model], logs / f"{name}.log", env=env, args=SERVE,
                          served_name=name, python=test_python)  # fmt: skip

    # The plain model is the dense reference (the FlashHead folders hold its weights), served
    # with the plugin loaded: FlashHead at every cluster must answer as it does.
    group = [
        server("fh-all", "fh-all", NEVER_DENSE),
        server("plain", "plain"),
        server("fh-1", "fh-1"),
    ]
    refused = server("refused", "fh-1", {"VLLM_PLUGINS": ""})
    out: dict = {}
    try:
        refused.start()
        start_all(group)
        for s in group:
            out[s.name] = _Answers(s)  # asks, then stops the server and keeps its log
        out["refused"] = _Refused(refused)
        yield out
    finally:
        for s in [*group, refused]:
            s.stop()


class _Answers:
    """Everything the tests ask of one server, asked while it runs (servers are stopped after)."""

    def __init__(self, server: VllmServer):
        # Text, not token ids: `return_token_ids` is newer than the oldest releases here.
        def complete(prompt: str, **params) -> dict:
            body = {"prompt": prompt, "max_tokens": N_TOKENS, "ignore_eos": True, **params}
            return server.post("/v1/completions", body)["choices"][0]

        def greedy(prompt: str) -> str:
            return complete(prompt, temperature=0.0)["text"]

        def seeded(prompt: str) -> str:
            return complete(prompt, temperature=0.8, top_p=0.9, seed=7)["text"]

        # One request at a time: equal batch shapes on every server.
        self.greedy = [greedy(p) for p in PROMPTS]
        self.seeded = [seeded(p) for p in PROMPTS]
        self.seeded_again = [seeded(p) for p in PROMPTS]
        # Rows that need vLLM's own logits. Which requests need them is read from the runner's
        # per-release batch state, so every release checks it. A +100 bias on a token of no
        # probed cluster would be lost (-inf + 100) had FlashHead served the row.
        logprobs = complete(PROMPTS[0], temperature=0.0, logprobs=3)
        self.logprobs_text = logprobs["text"]
        self.top_logprobs = logprobs["logprobs"]["top_logprobs"]
        self.biased = complete(PROMPTS[1], temperature=0.0, logit_bias={str(BIASED): 100.0})["text"]
        time.sleep(0.6)  # the workers write their counters every 0.25 s
        self.metrics = parse_reports(fetch_metrics_text(server.url))
        server.stop()
        self.log = server.log()


class _Refused:
    """A FlashHead model served without the plugin: vLLM exits, naming the architecture."""

    def __init__(self, server: VllmServer):
        assert server.proc is not None
        try:
            self.returncode = server.proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.returncode = None
        server.stop()
        self.log = server.log()


def _serves_flashhead(release: dict) -> bool:
    return release["patchset"]["serve"] == "flashhead"


def test_doctor_reports_the_patchset_for_this_release(release):
    ps = release["patchset"]
    assert ps and ps["name"], release
    if _serves_flashhead(release):
        required = [p for p in release["patches"] if p["required"]]
        assert required and all(p["status"] == "applied" for p in required), required
        assert release["ok"] and release["returncode"] == 0, release["stderr"][-2000:]
    else:
        assert ps["reason"], ps  # serve: dense always says why


def test_plugin_starts_in_every_vllm_process(servers, release):
    """Every vLLM process that logs (vLLM prefixes its lines with "(Name pid=N)") logged the
    plugin's start-up line with the release's patchset. Which processes exist differs: 0.16 runs
    the CPU worker inside the engine core, newer releases in a process of its own."""
    log = servers["fh-all"].log
    lines = [line for line in log.splitlines() if re.search(r"\bflashhead \d+\.\d+\S*: vLLM", line)]
    started = {m.group(1) for line in lines if (m := re.search(r", pid (\d+)\)", line))}
    pids = {pid: name for name, pid in re.findall(r"^\((\w+) pid=(\d+)\)", log, re.M)}
    assert any(n.startswith("APIServer") for n in pids.values()), pids
    assert any(n.startswith("EngineCore") for n in pids.values()), pids
    missing = {pid: name for pid, name in pids.items() if pid not in started}
    assert not missing, (missing, lines)
    assert all(f"patchset {release['patchset']['name']}" in line for line in lines), lines


def test_all_probes_equal_dense(servers, release):
    assert servers["fh-all"].greedy == servers["plain"].greedy
    log = servers["fh-all"].log
    if _serves_flashhead(release):
        assert_flashhead_path_only(log)
    else:
        assert SERVING_LINE not in log and "serve: dense" in log, log[-3000:]


def test_one_probe_differs_from_dense_and_flashhead_served_it(servers, release):
    if not _serves_flashhead(release):
        # serve: dense: the FlashHead model is the dense model, whatever its n_probes.
        assert servers["fh-1"].greedy == servers["plain"].greedy
        assert SERVING_LINE not in servers["fh-1"].log
        return
    assert servers["fh-1"].greedy != servers["plain"].greedy
    assert SERVING_LINE in servers["fh-1"].log, servers["fh-1"].log[-3000:]


@pytest.mark.parametrize("name", ["fh-1", "fh-all"])
def test_seeded_sampling_repeats(servers, name):
    assert servers[name].seeded == servers[name].seeded_again


def test_plain_model_is_untouched_by_the_plugin(servers):
    """A plain model served with the plugin loaded answers as FlashHead at every cluster (exact),
    and FlashHead neither serves nor counts it."""
    assert servers["plain"].greedy == servers["fh-all"].greedy
    assert servers["plain"].seeded == servers["fh-all"].seeded
    assert SERVING_LINE not in servers["plain"].log
    assert not servers["plain"].metrics


def test_rows_that_need_exact_logits_are_served_dense(servers):
    """logprobs and logit_bias requests on the one-probe model answer as the plain model."""
    fh, plain = servers["fh-1"], servers["plain"]
    assert fh.logprobs_text == plain.logprobs_text
    assert len(fh.top_logprobs) == len(plain.top_logprobs) == N_TOKENS
    for a, b in zip(fh.top_logprobs, plain.top_logprobs):
        assert a.keys() == b.keys()
        for tok in a:
            assert a[tok] == pytest.approx(b[tok], abs=1e-4)
    assert fh.biased == plain.biased
    assert plain.biased != plain.greedy[1]  # the bias changed the answer: the check bites


def test_metrics_count_the_rows_by_path(servers, release):
    (report,) = servers["fh-1"].metrics.values()
    if not _serves_flashhead(release):
        assert "flashhead" not in report.rows, report
        return
    # 4 greedy + 8 seeded requests of N_TOKENS rows each; the logprobs request's rows are dense.
    assert report.rows["flashhead"] >= 12 * N_TOKENS, report
    assert report.rows["dense:logprobs"] == N_TOKENS, report


def test_flashhead_model_is_refused_without_the_plugin(servers):
    refused = servers["refused"]
    assert refused.returncode not in (None, 0), refused.log[-3000:]
    assert "FlashHeadLlamaForCausalLM" in refused.log, refused.log[-3000:]
    assert "not supported" in refused.log.lower(), refused.log[-3000:]
