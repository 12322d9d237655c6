"""`flashhead bench` on a tiny shape: report contents, CLI wiring and argument errors."""

from __future__ import annotations

import json

import pytest

from flashhead import cli
from flashhead.bench import BenchConfig, flash_bytes, format_report, make_problem, run_bench


@pytest.fixture(autouse=True)
def no_compile(monkeypatch):
    from flashhead.kernels import reference

    monkeypatch.setenv("FLASHHEAD_CPU_COMPILE", "0")  # no 15 s compile for a tiny shape
    monkeypatch.setattr(reference, "_COMPILE_STATE", {})


TINY = dict(vocab=1000, hidden=32, cluster_size=16, probes=8, batches=(1, 3), iters=3, warmup=1)


def test_run_bench_reports_everything(monkeypatch):
    monkeypatch.setenv("FLASHHEAD_DENSE_MIN_BATCH", "3")  # force the dense path at B=3
    info = run_bench(BenchConfig(**TINY, threads=1))
    assert info["backend"] == "torch" and info["threads"] == 1
    assert info["config"]["mode"] == "logits"
    assert info["head"]["n_clusters"] == 63  # ceil(1000 / 16): padded, unequal clusters
    # one extra copy of the head (+ padding of 63 * 16 - 1000 slots), int8 centroids on top
    assert info["cluster_major_bytes"] == 63 * 16 * (32 * 2 + 4 + 4)  # bf16 rows + 2 int32 ids
    assert info["extra_bytes"] > info["cluster_major_bytes"]
    r1, r3 = info["results"]
    assert r1["flash_path"] == "flashhead" and r3["flash_path"] == "dense"
    for r in (r1, r3):
        assert r["ratio"] == pytest.approx(r["dense_ms"] / r["flash_ms"])
        assert 0.0 <= r["agreement"] <= 1.0
        assert r["flash_graph_ms"] is None  # no CUDA graphs on a CPU
    assert r3["agreement"] == 1.0  # the dispatcher's dense rows are vLLM's own logits
    assert info["bandwidth_gbs"] is None  # no device copy on CPU
    text = format_report(info)
    assert "memory: cluster-major copy" in text and "vLLM's logits call" in text
    json.dumps(info, default=str)


def test_bench_times_the_handlers_step(monkeypatch):
    """The FlashHead side is the logits processor's own per-step function."""
    from flashhead.handlers import step_logits

    calls = []
    real = step_logits.plan_logits

    def spy(head, h, plan, stock, transform):
        calls.append((h.shape[0], plan.num_rows, transform))
        return real(head, h, plan, stock, transform)

    monkeypatch.setattr(step_logits, "plan_logits", spy)
    cfg = BenchConfig(**{**TINY, "batches": (2,)}, soft_cap=30.0, temperature=0.7)
    info = run_bench(cfg)
    assert calls and all(c[:2] == (2, 2) for c in calls)
    assert calls[0][2].soft_cap == 30.0
    assert info["results"][0]["agreement"] is None  # sampled rows: no top-1 to compare
    assert "sampled rows, T=0.7" in format_report(info)


def test_tokens_mode_times_the_head_alone():
    info = run_bench(BenchConfig(**{**TINY, "batches": (1,)}, mode="tokens"))
    assert info["config"]["mode"] == "tokens" and info["results"][0]["agreement"] == 1.0
    assert "greedy token ids" in format_report(info)


def test_flash_bytes_counts_stage1_once_and_rows_per_row():
    cfg = BenchConfig(**TINY)
    cfg.validate()
    weight, assets = make_problem(cfg)
    from flashhead.head import FlashHead

    head = FlashHead.build(weight, assets, backend="torch")
    one, two = flash_bytes(head, 1), flash_bytes(head, 2)
    per_row = 8 * 16 * (32 * weight.element_size() + 4)  # p * s rows of d + an int32 slot id
    assert two - one == per_row
    assert one - per_row == 63 * 32 + 63 * 4  # int8 centroids + fp32 scales


def test_cli_json(capsys):
    argv = ["bench", "--vocab", "1000", "--hidden", "32", "--probes", "8", "--batch", "1"]
    assert cli.main(argv + ["--iters", "2", "--warmup", "1", "--threads", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["batches"] == [1] and info["results"][0]["batch"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--probes", "100"], "--probes 100: must be in [1, 63]"),
        (["--cluster-size", "0"], "must be positive"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--mode", "tokens", "--temperature", "1"], "--temperature must be >= 0, and > 0 only"),
        (["--soft-cap", "-1"], "--soft-cap must be > 0"),
    ],
)
def test_cli_rejects_bad_arguments(capsys, args, message):
    assert cli.main(["bench", "--vocab", "1000", "--hidden", "32", "--probes", "8", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_bad_batch_list(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--batch", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err
