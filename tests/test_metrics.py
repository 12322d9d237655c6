"""FlashHead's /metrics channel, settings and shadow check, without vLLM.

Worker processes are real subprocesses here: the directory a server creates must reach them
through the environment, and their counters must come back through the collector.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from flashhead import metrics
from flashhead.handlers.shadow import ShadowCheck
from flashhead.settings import METRICS_DIR_ENV, parse


@pytest.fixture
def fresh_metrics(monkeypatch):
    """A process state as if no server had set up metrics yet."""
    # setenv first: monkeypatch then restores the variable (what setup_server_process writes
    # into os.environ, too) as it was before the test, set or not.
    monkeypatch.setenv(METRICS_DIR_ENV, "unset-by-test")
    monkeypatch.delenv(METRICS_DIR_ENV)
    monkeypatch.setattr(metrics, "_server_dir", None)
    monkeypatch.setattr(metrics, "_flusher", None)
    monkeypatch.setattr(metrics, "_counters", metrics.RowCounters())
    yield


def _exposed(registry) -> str:
    return generate_latest(registry).decode()


WORKER = textwrap.dedent(
    """
    import sys
    from flashhead import metrics
    c = metrics.counters()
    c.count_rows(sys.argv[1], "flashhead", "", int(sys.argv[2]))
    c.count_rows(sys.argv[1], "dense", "logprobs", 3)
    c.count_shadow(sys.argv[1], 10, 9, 10)
    if len(sys.argv) > 3:
        c.set_head(sys.argv[1], sys.argv[3])
    metrics.flush_now()
    """
)


def _worker(model: str, n: int, env: dict, layout: str = "") -> None:
    args = [model, str(n), *([layout] if layout else [])]
    subprocess.run([sys.executable, "-c", WORKER, *args], env=env, check=True)


def test_counters_from_worker_processes_reach_the_server_registry(fresh_metrics):
    registry = CollectorRegistry()
    directory = metrics.setup_server_process(registry)
    assert directory and os.environ[METRICS_DIR_ENV] == directory
    env = dict(os.environ)
    _worker("m", 5, env)
    _worker("m", 7, env)  # a second worker process: the scrape sums both
    text = _exposed(registry)
    assert 'flashhead_decode_rows_total{model_name="m",path="flashhead",reason=""} 12.0' in text
    assert 'flashhead_decode_rows_total{model_name="m",path="dense",reason="logprobs"} 6.0' in text
    assert 'flashhead_shadow_rows_total{model_name="m"} 20.0' in text
    assert 'flashhead_shadow_top1_agree_total{model_name="m"} 18.0' in text
    assert 'flashhead_fallback_active{model_name="m"} 0.0' in text


def test_heads_by_layout_sum_over_processes_and_the_doctor_names_the_layout(fresh_metrics):
    from flashhead.server_report import describe_layout, parse_reports

    registry = CollectorRegistry()
    metrics.setup_server_process(registry)
    env = dict(os.environ)
    _worker("tp", 5, env, metrics.LAYOUT_TENSOR_PARALLEL)
    _worker("tp", 0, env, metrics.LAYOUT_TENSOR_PARALLEL)  # rank 1 counts no rows
    _worker("dp", 5, env, metrics.LAYOUT_SINGLE)
    _worker("dp", 5, env, metrics.LAYOUT_SINGLE)
    text = _exposed(registry)
    assert 'flashhead_heads{layout="tensor_parallel_rank",model_name="tp"} 2.0' in text
    reports = parse_reports(text)
    assert describe_layout(reports["tp"].heads).startswith("2 tensor-parallel ranks")
    assert describe_layout(reports["dp"].heads).startswith("2 FlashHead heads, one per worker")
    assert describe_layout({}) == "no FlashHead head built yet"


def test_in_vllm_multiprocess_mode_the_counters_reach_its_registry(fresh_metrics, tmp_path):
    # Several API servers (--api-server-count > 1, or --data-parallel-size N): vLLM serves a
    # fresh registry over PROMETHEUS_MULTIPROC_DIR per scrape, as built here.
    from prometheus_client import multiprocess

    env = {**os.environ, metrics.PROMETHEUS_MULTIPROC_DIR: str(tmp_path)}
    _worker("m", 5, env, metrics.LAYOUT_SINGLE)
    _worker("m", 7, env, metrics.LAYOUT_SINGLE)  # the second engine's worker
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(tmp_path))
    text = _exposed(registry)
    assert 'flashhead_decode_rows_total{model_name="m",path="flashhead",reason=""} 12.0' in text
    assert 'flashhead_shadow_top1_agree_total{model_name="m"} 18.0' in text
    assert 'flashhead_fallback_active{model_name="m"} 0.0' in text
    assert 'flashhead_heads{layout="single",model_name="m"} 2.0' in text


def test_two_servers_keep_their_counters_apart(fresh_metrics, monkeypatch):
    first = CollectorRegistry()
    dir_a = metrics.setup_server_process(first)
    env_a = dict(os.environ)
    # A second server: another process that set up its own directory.
    monkeypatch.delenv(METRICS_DIR_ENV)
    monkeypatch.setattr(metrics, "_server_dir", None)
    second = CollectorRegistry()
    dir_b = metrics.setup_server_process(second)
    env_b = dict(os.environ)
    assert dir_a != dir_b
    _worker("a", 4, env_a)
    _worker("b", 9, env_b)
    text_a, text_b = _exposed(first), _exposed(second)
    assert 'model_name="a"' in text_a and 'model_name="b"' not in text_a
    assert 'model_name="b"' in text_b and 'model_name="a"' not in text_b


def test_a_server_started_below_another_makes_its_own_directory(fresh_metrics, tmp_path):
    # A test runner (or any process) that set up metrics, then starts `vllm serve`: that server
    # must not count into the runner's directory.
    os.environ[METRICS_DIR_ENV] = str(tmp_path)
    directory = metrics.setup_server_process(CollectorRegistry())
    assert directory != str(tmp_path) and os.environ[METRICS_DIR_ENV] == directory


def test_only_a_server_s_first_process_sets_up_metrics(fresh_metrics, monkeypatch):
    from flashhead import plugin

    for kind, expected in (("engine", False), ("worker", False), ("api", True)):
        monkeypatch.setattr(metrics, "_server_dir", None)
        monkeypatch.delenv(METRICS_DIR_ENV, raising=False)
        plugin._setup_metrics(kind)
        assert (metrics._server_dir is not None) is expected, kind


def test_no_series_before_any_flashhead_row(fresh_metrics):
    registry = CollectorRegistry()
    metrics.setup_server_process(registry)
    assert "flashhead_" not in _exposed(registry)


def test_an_unreadable_worker_file_is_skipped(tmp_path):
    (tmp_path / "worker-1.json").write_text("{not json")
    (tmp_path / "worker-2.json").write_text('{"rows": [["m", "flashhead", "", 2]]}')
    assert metrics.read_directory(tmp_path)["rows"] == [["m", "flashhead", "", 2]]


@pytest.mark.parametrize(
    "env, shadow, minimum, problem",
    [
        ({}, 0.0, None, None),
        ({"FLASHHEAD_SHADOW": "0.01"}, 0.01, None, None),
        ({"FLASHHEAD_SHADOW": "1", "FLASHHEAD_SHADOW_MIN_AGREEMENT": "0.99"}, 1.0, 0.99, None),
        ({"FLASHHEAD_SHADOW": "lots"}, 0.0, None, "FLASHHEAD_SHADOW='lots'"),
        ({"FLASHHEAD_SHADOW": "1.5"}, 0.0, None, "between 0 and 1"),
        ({"FLASHHEAD_SHADOW": "nan"}, 0.0, None, "between 0 and 1"),
        ({"FLASHHEAD_SHADOW_MIN_AGREEMENT": "0.9"}, 0.0, 0.9, "the guard needs shadow rows"),
    ],
)
def test_settings_parse_and_name_bad_values(env, shadow, minimum, problem):
    s = parse(env)
    assert (s.shadow, s.shadow_min_agreement) == (shadow, minimum)
    if problem is None:
        assert s.problems == ()
    else:
        assert len(s.problems) == 1 and problem in s.problems[0]


def test_shadow_compare_counts_top1_and_top5():
    check = ShadowCheck(1.0)
    dense = torch.tensor(
        [[0.0, 5.0, 1.0, 2.0, 3.0, 4.0, -1.0], [9.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    )
    flash = dense.clone()
    flash[1, 0] = float("-inf")  # row 1: FlashHead missed the dense top-1 entirely
    assert check.compare(flash, dense) == (2, 1, 1)
    flash[1, 0] = 4.5  # now second best: not top-1, but in the top 5
    assert check.compare(flash, dense) == (2, 1, 2)


def test_shadow_pick_is_a_share_and_leaves_the_global_rng_alone():
    check = ShadowCheck(0.25, seed=0)
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    picked = sum(len(check.pick(range(100))) for _ in range(40))
    assert 800 <= picked <= 1200
    assert torch.equal(torch.rand(3), expected)
    assert ShadowCheck(0.0).pick([1, 2]) == [] and ShadowCheck(1.0).pick([1, 2]) == [1, 2]


def test_guard_trips_below_the_minimum_and_stays_tripped():
    check = ShadowCheck(1.0, 0.99, window=64, min_rows=16)
    dense = torch.eye(8)[torch.arange(16) % 8]
    assert check.compare(dense, dense)[1] == 16 and check.check_guard() == ""
    wrong = dense.roll(1, dims=1)
    check.compare(wrong[:1], dense[:1])  # 16/17 = 0.94 < 0.99
    reason = check.check_guard()
    assert "0.9412 over the last 17 shadow rows" in reason
    check.compare(dense, dense)
    assert check.check_guard() == reason  # it never switches back


def test_guard_waits_for_its_minimum_rows():
    check = ShadowCheck(1.0, 0.99, window=64, min_rows=16)
    eye = torch.eye(8)
    check.compare(eye.roll(1, dims=1), eye)  # 8 misses, but only 8 rows
    assert check.check_guard() == ""


def test_doctor_url_reports_a_server_and_names_an_unreachable_one(fresh_metrics, capsys):
    import http.server
    import json
    import threading

    from helpers.server import free_port

    from flashhead.server_report import run_server_report

    registry = CollectorRegistry()
    metrics.setup_server_process(registry)
    # 90 FlashHead rows, 3 logprobs rows, 10 shadow rows, one single-rank head
    _worker("m", 90, dict(os.environ), metrics.LAYOUT_SINGLE)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = generate_latest(registry)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert run_server_report(url) == 0
        text = capsys.readouterr().out
        assert "decode rows: 93" in text and "dense:logprobs" in text
        assert "layout: one FlashHead head (one worker)" in text
        assert "top-1 agreement 90.00 % over 10 rows" in text
        assert run_server_report(url, as_json=True) == 0
        (model,) = json.loads(capsys.readouterr().out)["models"]
        assert model["rows"] == {"flashhead": 90, "dense:logprobs": 3}
        assert model["agreement"] == 0.9 and model["fallback_active"] is False
    finally:
        server.shutdown()
    assert run_server_report(f"http://127.0.0.1:{free_port()}") == 1
    assert "cannot read" in capsys.readouterr().out
