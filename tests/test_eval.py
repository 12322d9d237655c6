"""`flashhead eval` metrics: the rank-based p curve against brute force, end-to-end agreement
through FlashHead, the report, and the CLI on a tiny converted model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import cached_tiny_model

from flashhead.assets import FlashHeadAssets, load_assets
from flashhead.calibration.ranks import agreement_at, cluster_ranks, dense_topk, probes_for
from flashhead.cli import main as cli_main
from flashhead.convert import ConvertOptions, convert
from flashhead.evaluation import Evaluator, format_table


def _assets(centroids: torch.Tensor, assignments: torch.Tensor, specials=()) -> FlashHeadAssets:
    return FlashHeadAssets(
        model_dir=Path("."),
        cache_dir=Path("."),
        centroids=centroids,
        assignments=assignments,
        n_probes=4,
        special_token_ids=list(specials),
    )


def test_cluster_ranks_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assignments = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    top = torch.tensor([[0, 4, 6, 2, 7]])  # clusters 0, 2, 3, 1, 3
    ranks = cluster_ranks(scores, assignments, top, specials=[7])
    assert ranks.tolist() == [[3, 1, 2, 0, -1]]
    assert agreement_at(ranks[:, 0], 3) == 0.0 and agreement_at(ranks[:, 0], 4) == 1.0


def test_probes_for_is_the_smallest_p_reaching_the_target():
    ranks = torch.tensor([0, 0, 1, 5, -1, 2, 0, 9, 3, 0])
    for target in (0.5, 0.8, 0.9, 1.0):
        p = probes_for(ranks, target)
        assert agreement_at(ranks, p) >= target
        assert p == 1 or agreement_at(ranks, p - 1) < target


def test_rank_curve_matches_flashhead_end_to_end():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 32, generator=g)
    assignments = torch.randperm(512, generator=g) % 32
    centroids = torch.stack([w[assignments == c].mean(0) for c in range(32)])
    ev = Evaluator(w, _assets(centroids, assignments, specials=[3]))
    h = torch.randn(300, 32, generator=g)
    top = dense_topk(h, w, 5)
    assert torch.equal(top[:, 0], (h @ w.T).argmax(1))
    ranks = ev.ranks(h, top)
    for p in (1, 4, 16, 32):
        top1, top5 = ev.measured(h, top, p)
        assert abs(top1 - agreement_at(ranks[:, 0], p)) < 0.01
        assert abs(top5 - agreement_at(ranks, p)) < 0.01
    assert ev.measured(h, top, 32) == (1.0, 1.0)
    rep = ev.report(h, [4, 64], [0.9], model="m")
    assert [r.probes for r in rep.results] == [4, 32]  # clamped to the number of clusters
    assert rep.results[0].candidates == 4 * 16 + 1
    assert rep.results[1].top1_agreement == 1.0
    p90 = rep.probes_for_target["90%"]
    assert agreement_at(ranks[:, 0], p90) >= 0.9
    assert "top-1 agreement 90%" in format_table(rep)


@pytest.fixture(scope="module")
def tiny_flashhead(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("FLASHHEAD_TEST_CACHE", tmp_path_factory.mktemp("tiny-cache")))
    src = cached_tiny_model(cache, vocab_size=1024, hidden=64, layers=2)
    out = tmp_path_factory.mktemp("fh") / "tiny-fh"
    convert(
        src,
        out,
        ConvertOptions(
            stage1="centroids",
            iterations=3,
            calibration_tokens=512,
            chat_tokens=512,
            code_tokens=512,
            sample_tokens=512,
            cluster_size=16,
            progress=False,
        ),
    )
    return out


def test_cli_eval_json(tiny_flashhead, capsys):
    rc = cli_main(
        [
            "eval", str(tiny_flashhead), "--probes", "1,8,64", "--tokens", "256", "--json",
            "--quiet", "--corpus", "prose,chat", "--answers", "0",
        ]
    )  # fmt: skip
    assert rc == 0
    reports = json.loads(capsys.readouterr().out)
    assert set(reports) == {"prose", "chat"}
    assert reports["chat"]["meta"]["corpus"] == "chat"
    assert reports["chat"]["n_tokens"] == 256  # answers to the held-out prompts, cut at --tokens
    rep = reports["prose"]
    assert rep["vocab_size"] == 1024 and rep["n_tokens"] == 256
    by_p = {r["probes"]: r for r in rep["results"]}
    assert {1, 8, 64} <= set(by_p)  # plus the model's own n_probes
    assert by_p[64]["top1_agreement"] == 1.0 and by_p[64]["top5_containment"] == 1.0
    assert by_p[1]["top1_agreement"] <= by_p[8]["top1_agreement"] <= 1.0
    assert by_p[8]["share_of_vocab"] == pytest.approx((8 * 16 + rep["n_special"]) / 1024)
    assert set(rep["probes_for_target"]) == {"99%", "99.5%", "99.9%"}


def test_cli_eval_text_file_and_errors(tiny_flashhead, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 40)
    rc = cli_main(
        [
            "eval",
            str(tiny_flashhead),
            "--text",
            str(text),
            "--tokens",
            "128",
            "--corpus",
            "prose",
            "--answers",
            "0",
            "--quiet",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "top-1 agreement 99.5%" in out and "[text: the user's text]" in out
    assert "[prose: stdlib pydoc topics" in out and "[chat:" not in out
    # the summary names both families, the user's text marked as never calibrated on
    assert any(line.startswith("text ") and "never" in line for line in out.splitlines())
    short = tmp_path / "short.txt"
    short.write_text("hi")
    assert cli_main(["eval", str(tiny_flashhead), "--text", str(short), "--quiet"]) == 2
    assert "longer text" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path), "--quiet"]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["eval", str(tiny_flashhead), "--probes", "0,4"])
    with pytest.raises(SystemExit):
        cli_main(["eval", str(tiny_flashhead), "--corpus", "prose,poetry"])
    assert "prose, code, docstrings, markdown, qa, chat, self" in capsys.readouterr().err
    assert cli_main(["eval", str(tiny_flashhead), "--answers", "-1", "--quiet"]) == 2
    assert "--answers" in capsys.readouterr().err


def test_every_family_is_reported_worst_first_at_the_configured_probes(tiny_flashhead):
    from flashhead.evaluation import FAMILIES, evaluate, format_summary, top1_at

    reports = evaluate(tiny_flashhead, probes=[2], n_tokens=192, progress=False)
    assert set(reports) == set(FAMILIES)
    served = load_assets(tiny_flashhead).n_probes
    at_p = [top1_at(r, served) for r in reports.values()]
    assert at_p == sorted(at_p)  # worst first
    never = {k for k, r in reports.items() if r.meta["calibrated_on"] == "never"}
    assert never == {"docstrings", "markdown", "qa"}
    summary = format_summary(reports).splitlines()
    assert f"n_probes = {served}" in summary[0]
    assert [line.split()[0] for line in summary[2:]] == list(reports)


def test_answers_are_identical_at_all_probes_and_part_at_one(tiny_flashhead):
    from flashhead.answers import compare_answers, format_answers
    from flashhead.calibration.model import load_model
    from flashhead.evaluation import Evaluator

    model, tok = load_model(tiny_flashhead)
    ev = Evaluator(model.get_output_embeddings().weight.detach(), load_assets(tiny_flashhead))
    every = compare_answers(model, tok, ev.head, ev.head.n_clusters, limit=6, max_new_tokens=12)
    assert every.identical == every.questions == 6 and not every.differing
    one = compare_answers(model, tok, ev.head, 1, limit=6, max_new_tokens=12)
    assert one.identical < 6 and len(one.differing) == 6 - one.identical
    assert one.differing[0]["dense"] != one.differing[0]["flashhead"]
    text = format_answers(one)
    assert f"{one.identical}/6 identical to dense" in text and "FlashHead:" in text
