"""`flashhead convert` end to end on tiny local models: layout, round trip through the core's
loader, hard links, --force, interruption, tied heads, bad input, the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import cached_tiny_model
from safetensors import safe_open

from flashhead.assets import load_assets
from flashhead.cli import main as cli_main
from flashhead.convert import ConvertError, ConvertOptions, convert
from flashhead.head import FlashHead

# Cluster size 16 keeps these layout tests at 64 clusters; the default (4) has its own test.
FAST = dict(
    stage1="centroids",
    iterations=3,
    progress=False,
    calibration_tokens=512,
    chat_tokens=512,
    code_tokens=512,
    sample_tokens=512,
    cluster_size=16,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """An untied tiny Llama (V=1024, d=64) with its tokenizer."""
    cache = Path(os.environ.get("FLASHHEAD_TEST_CACHE", tmp_path_factory.mktemp("tiny-cache")))
    return cached_tiny_model(cache, vocab_size=1024, hidden=64, layers=2)


@pytest.fixture(scope="module")
def tiny_tied(tiny, tmp_path_factory) -> Path:
    """The same model with a tied head (no lm_head.weight in the checkpoint)."""
    import transformers

    out = tmp_path_factory.mktemp("tied")
    for f in tiny.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    cfg = transformers.LlamaConfig.from_pretrained(tiny)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


def _head_weight(folder: Path, key: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(key)


def test_layout_and_round_trip_through_the_core_loader(tiny, tmp_path):
    out = tmp_path / "fh"
    res = convert(tiny, out, ConvertOptions(centroids="mean", probes=8, **FAST))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["FlashHeadLlamaForCausalLM"]
    assert cfg["flash_head_cache_dir"] == "flash_head_cache"
    assert cfg["n_probes"] == 8
    assert (out / "flash_head_cache" / "clustering_cache.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    # Upstream layout on disk: centroids [d, c].
    with safe_open(str(out / "flash_head_cache" / "clustering_cache.safetensors"), "pt") as f:
        assert list(f.get_slice("centroids").get_shape()) == [64, 64]
        assert list(f.get_slice("cluster_assignments").get_shape()) == [1024]

    assets = load_assets(out)
    assert assets.n_clusters == 64 and assets.vocab_size == 1024 and assets.n_probes == 8
    assert torch.bincount(assets.assignments).tolist() == [16] * 64
    tok = json.loads((tiny / "tokenizer_config.json").read_text())
    assert res.special_token_ids == assets.special_token_ids
    assert assets.special_token_ids  # <|endoftext|> and <|pad|> from the tokenizer
    assert tok  # the tokenizer was readable
    # Mean centroids: exactly the mean of each cluster's head rows.
    w = _head_weight(tiny, "lm_head.weight").float()
    for c in (0, 17, 63):
        assert torch.allclose(assets.centroids[c], w[assets.assignments == c].mean(0), atol=1e-5)
    # The core builds a working FlashHead from it: all clusters probed = the dense argmax.
    head = FlashHead.build(w, assets, backend="torch")
    h = torch.randn(4, 64)
    cand = head.candidates(h, n_probes=64)
    best = cand.ids.gather(1, cand.scores.argmax(1, keepdim=True)).squeeze(1)
    assert torch.equal(best, (h @ w.T).argmax(1))


def test_weights_are_hard_linked_not_rewritten(tiny, tmp_path):
    out = tmp_path / "fh"
    convert(tiny, out, ConvertOptions(centroids="mean", **FAST))
    src, dst = (tiny / "model.safetensors").stat(), (out / "model.safetensors").stat()
    assert (src.st_ino, src.st_dev) == (dst.st_ino, dst.st_dev)
    # config.json is a new file: writing the FlashHead keys never touched the source.
    assert "flash_head_cache_dir" not in json.loads((tiny / "config.json").read_text())


def test_tied_head_uses_the_embedding(tiny_tied, tmp_path):
    out = tmp_path / "fh"
    convert(tiny_tied, out, ConvertOptions(centroids="mean", **FAST))
    assets = load_assets(out)
    emb = _head_weight(tiny_tied, "model.embed_tokens.weight").float()
    assert torch.allclose(assets.centroids[5], emb[assets.assignments == 5].mean(0), atol=1e-5)


def test_fit_with_auto_probes_agrees_with_the_dense_head(tiny, tmp_path):
    from flashhead.calibration.texts import stdlib_text
    from flashhead.convert.fit import sample_calibration
    from flashhead.evaluation import Evaluator

    out = tmp_path / "fh"
    # A random-weight model needs most clusters: lift the 10% cap to test the estimate itself.
    opts = ConvertOptions(centroids="fit", max_share=1.0, target_agreement=0.995, **FAST)
    res = convert(tiny, out, opts)
    assets = load_assets(out)
    assert 1 <= res.n_probes == assets.n_probes <= 64
    assert set(res.probe_estimates) == {"prose", "code", "chat", "self"} and not res.probes_capped
    assert res.n_probes >= max(res.probe_estimates.values())
    capped = convert(tiny, tmp_path / "capped", ConvertOptions(centroids="fit", **FAST))
    assert capped.probes_capped and capped.n_probes * 16 <= 0.10 * 1024
    # Held-out text: agreement at the chosen p stays close to the 99.5% target.
    h = sample_calibration(
        out, prose_tokens=1024, chat_tokens=0, text=stdlib_text("evaluation"), progress=False
    ).h
    w = _head_weight(tiny, "lm_head.weight")
    rep = Evaluator(w, assets).report(h, [assets.n_probes], [0.995], check_end_to_end=True)
    assert rep.results[0].top1_agreement >= 0.97


def test_refuses_a_non_empty_output_without_force(tiny, tmp_path):
    out = tmp_path / "fh"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="--force"):
        convert(tiny, out, ConvertOptions(centroids="mean", **FAST))
    assert (out / "keep.txt").read_text() == "mine"
    convert(tiny, out, ConvertOptions(centroids="mean", force=True, **FAST))
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_an_empty_output_folder_is_fine(tiny, tmp_path):
    out = tmp_path / "fh"
    out.mkdir()
    convert(tiny, out, ConvertOptions(centroids="mean", **FAST))
    assert (out / "config.json").is_file()


def test_refuses_output_inside_or_equal_to_the_source(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny, src)
    for out in (src, src / "inner"):
        with pytest.raises(ConvertError, match="overlaps the source"):
            convert(src, out, ConvertOptions(centroids="mean", force=True, **FAST))
    assert (src / "model.safetensors").is_file()


@pytest.mark.parametrize("stage1", ["centroids", "head-int4"])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupt_leaves_no_half_written_output(tiny, tmp_path, monkeypatch, existing, stage1):
    import flashhead.convert.build as build

    out = tmp_path / "fh"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "write_assets", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opts = ConvertOptions(centroids="mean", force=True, **FAST)
        convert(tiny, out, dataclasses.replace(opts, stage1=stage1))
    if existing:
        assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["fh"] if existing else [])


def test_cluster_size_must_divide_the_vocabulary(tiny, tmp_path):
    with pytest.raises(ConvertError, match="not a multiple of --cluster-size 24"):
        convert(tiny, tmp_path / "fh", ConvertOptions(**{**FAST, "cluster_size": 24}))
    assert not (tmp_path / "fh").exists()


def test_bad_sources_get_clear_errors(tmp_path):
    with pytest.raises(ConvertError, match="no such file or folder"):
        convert(tmp_path / "nope", tmp_path / "out", ConvertOptions(**FAST))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="config.json: no such file"):
        convert(tmp_path / "empty", tmp_path / "out", ConvertOptions(**FAST))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ConvertError, match="not a .gguf file"):
        convert(tmp_path / "model.bin", tmp_path / "out", ConvertOptions(**FAST))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConvertError, match="not valid JSON"):
        convert(bad, tmp_path / "out", ConvertOptions(**FAST))


def test_cli_convert_and_special_tokens_option(tiny, tmp_path, capsys):
    out = tmp_path / "fh"
    rc = cli_main(
        [
            "convert", str(tiny), str(out), "--centroids", "normalized", "--probes", "4",
            "--iterations", "2", "--special-tokens", "5,7", "--cluster-size", "16", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    assets = load_assets(out)
    assert assets.special_token_ids == [5, 7] and assets.n_probes == 4
    assert torch.allclose(assets.centroids.norm(dim=1), torch.ones(64), atol=1e-4)
    assert "FlashHeadLlamaForCausalLM" in capsys.readouterr().out
    # Second run without --force: refused with exit code 2 and a hint.
    assert cli_main(["convert", str(tiny), str(out), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["convert", str(tiny), str(tmp_path / "o"), "--special-tokens", "a,b"])
    assert "--special-tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["convert", str(tiny), str(tmp_path / "o"), "--cluster-size", "0"])
    rc = cli_main(["convert", str(tiny), str(tmp_path / "o"), "--target-agreement", "100"])
    assert rc == 2 and "--target-agreement" in capsys.readouterr().err
    rc = cli_main(["convert", str(tiny), str(tmp_path / "o"), "--max-share", "0"])
    assert rc == 2 and "--max-share 0.0: expected a percentage in (0, 100]" in (
        capsys.readouterr().err
    )
    rc = cli_main(["convert", str(tiny), str(tmp_path / "o"), "--chat-tokens", "-1"])
    assert rc == 2 and "--chat-tokens must be 0 or more" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_prose_only_calibration_and_the_cap_warning(tiny, tmp_path, capsys):
    out = tmp_path / "fh"
    rc = cli_main(
        [
            "convert", str(tiny), str(out), "--chat-tokens", "0", "--calibration-tokens", "512",
            "--code-tokens", "0", "--iterations", "2", "--quiet",
        ]
    )  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    # A random-weight model needs far more than 10% of V: the cap decides, and says so.
    assert "capped by --max-share" in err and "'prose'" in err and "'chat'" not in err
    assert "'code'" not in err
    assets = load_assets(out)
    assert assets.n_clusters == 256 and set(assets.cluster_sizes().tolist()) == {4}  # default
    assert assets.n_probes * 4 <= 0.10 * 1024
