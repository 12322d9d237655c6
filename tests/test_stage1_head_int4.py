"""Stage 1 on the head's own rows at int4 (`flash_head_stage1: head_int4`, `flashhead convert
--stage1 head-int4`): the assets, the converter, the head, and the case it exists for, a rare
token whose cluster the centroids rank too low."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import cached_tiny_model
from safetensors import safe_open

from flashhead.assets import FlashHeadAssetError, FlashHeadAssets, load_assets, write_assets
from flashhead.cli import main as cli_main
from flashhead.convert import ConvertError, ConvertOptions, convert
from flashhead.head import FlashHead
from flashhead.kernels import reference


def _assets(v: int, d: int, n_probes: int, tmp_path: Path, **cfg) -> FlashHeadAssets:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": v, "hidden_size": d, **cfg}))
    write_assets(tmp_path, None, torch.randperm(v), n_probes=n_probes, stage1="head_int4")
    return load_assets(tmp_path)


def test_assets_round_trip_without_centroids(tmp_path):
    assets = _assets(256, 64, 8, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["flash_head_stage1"] == "head_int4" and cfg["n_clusters"] == 256
    with safe_open(str(assets.cache_dir / "clustering_cache.safetensors"), "pt") as f:
        assert set(f.keys()) == {"cluster_assignments"}  # no centroids stored
    assert assets.stage1 == "head_int4"
    assert (assets.n_clusters, assets.hidden_size, assets.vocab_size) == (256, 64, 256)


def test_centroid_assets_keep_upstreams_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"flash_head_stage1": "head_int4"}))
    write_assets(tmp_path, torch.randn(4, 8), torch.arange(16) % 4, n_probes=2)
    assert "flash_head_stage1" not in json.loads((tmp_path / "config.json").read_text())
    assert load_assets(tmp_path).stage1 == "centroids"


@pytest.mark.parametrize(
    "change, field, fragment",
    [
        ({"flash_head_stage1": "int3"}, "flash_head_stage1", "'head_int4'"),
        ({"hidden_size": None}, "hidden_size", "missing"),
    ],
)
def test_bad_head_int4_configs_name_the_field_and_the_fix(tmp_path, change, field, fragment):
    _assets(64, 32, 4, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlashHeadAssetError) as info:
        load_assets(tmp_path)
    assert info.value.field == field and fragment in str(info.value)
    assert "Fix:" in str(info.value)


def test_head_int4_needs_one_token_per_cluster(tmp_path):
    _assets(64, 32, 4, tmp_path)
    from safetensors.torch import save_file

    path = tmp_path / "flash_head_cache" / "clustering_cache.safetensors"
    save_file({"cluster_assignments": torch.arange(64) % 16}, str(path))
    with pytest.raises(FlashHeadAssetError, match="cluster of its own"):
        load_assets(tmp_path)


def _rare_token_case(v: int = 512, d: int = 64, seed: int = 0):
    """A head where token `rare` is the best by far for the probe state h, but its centroid
    cluster (with three tokens that h scores very low) averages to a mediocre centroid score."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g) * 0.5
    h = torch.randn(1, d, generator=g)
    u = h / h.norm()
    rare = 7
    w[rare] = w[rare] - (w[rare] @ u.T) * u + 4.0 * u  # logit ~ 4 |h|: far above the rest
    mates = [8, 9, 10]
    for m in mates:
        w[m] = w[m] - (w[m] @ u.T) * u - 3.0 * u  # far below
    assign = torch.arange(v) // 4  # clusters of 4: {4k..4k+3}
    assign[rare], assign[11] = 2, 1  # rare joins 8, 9, 10; 11 takes its place
    return w, h, rare, assign


def test_the_rare_token_the_centroids_miss_is_found_at_int4(tmp_path):
    w, h, rare, assign = _rare_token_case()
    assert int((h @ w.T).argmax()) == rare
    c = int(assign.max()) + 1
    mean = torch.stack([w[assign == k].mean(0) for k in range(c)])
    (tmp_path / "cent").mkdir()
    (tmp_path / "cent" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    write_assets(tmp_path / "cent", mean, assign, n_probes=2)
    by_centroids = FlashHead.build(w, load_assets(tmp_path / "cent"), backend="reference")
    # At 2 of 128 clusters the mean centroids miss it: the cluster averages a rare token with
    # three that h scores very low (docs/convert.md, "Where the remaining misses come from").
    assert int(by_centroids.tokens(h)[0]) != rare
    (tmp_path / "int4").mkdir()
    by_rows = FlashHead.build(w, _assets(512, 64, 8, tmp_path / "int4"), backend="reference")
    assert int(by_rows.tokens(h)[0]) == rare


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_head_int4_agrees_with_the_dense_head(tmp_path, backend):
    g = torch.Generator().manual_seed(1)
    v, d = 2048, 128
    w = (torch.randn(v, d, generator=g) * 0.05).to(torch.bfloat16)
    head = FlashHead.build(w, _assets(v, d, 64, tmp_path), backend=backend)
    h = torch.randn(16, d, generator=g).to(torch.bfloat16)
    dense = (h.float() @ w.float().T).argmax(1)
    assert torch.equal(head.tokens(h), dense)
    # The extra memory is the int4 rows and the slot maps, no copy of the head (stage 2 reads
    # the head itself by token id), and on the torch backend torch's int4 pack of the rows,
    # built with the head and counted.
    head_bytes = w.numel() * w.element_size()
    cached = reference.stage1_cache_bytes(head._buffers)
    group = head.index.rows4.group
    rows4_bytes = v * (d // 2) + v * (d // group) * 2 * 4  # codes, fp32 scale and zero
    slot_bytes = 2 * 4 * head.index.slot_ids.numel()  # int32 token and home per slot
    placeholder = 4 * v  # the centroid scales' [c] float32, unread with int4 rows
    assert head.index.wc.numel() == 0
    assert head.extra_bytes - cached == rows4_bytes + slot_bytes + placeholder
    assert (head.extra_bytes - cached) / head_bytes < 0.4
    if backend == "torch":  # per row: d/2 bytes of codes and a bf16 (scale, zero) per group
        assert cached == v * (d // 2 + (d // head.index.rows4.group) * 2 * 2)
    else:
        assert cached == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("FLASHHEAD_TEST_CACHE", tmp_path_factory.mktemp("tiny-cache")))
    return cached_tiny_model(cache, vocab_size=1024, hidden=64, layers=2)


def test_convert_head_int4_needs_no_calibration(tiny, tmp_path, capsys):
    out = tmp_path / "fh"
    assert (
        cli_main(["convert", str(tiny), str(out), "--stage1", "head-int4", "--probes", "32"]) == 0
    )
    assets = load_assets(out)
    assert assets.stage1 == "head_int4" and assets.n_clusters == 1024 and assets.n_probes == 32
    assert torch.equal(assets.assignments, torch.arange(1024))
    assert "clusters of 1" in capsys.readouterr().err
    res = convert(tiny, tmp_path / "default", ConvertOptions(stage1="head-int4", progress=False))
    assert res.n_probes == 512 and "calibrate" not in res.seconds


def test_convert_rejects_an_unknown_stage1(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # argparse's choices: usage error, exit 2
        cli_main(["convert", str(tiny), str(tmp_path / "x"), "--stage1", "int2"])
    assert info.value.code == 2 and "--stage1" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="--stage1"):
        convert(tiny, tmp_path / "y", ConvertOptions(stage1="int2", progress=False))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_centroid_options_select_centroids_and_clash_with_head_int4(tiny, tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["convert", str(tiny), str(out), "--quiet", "--centroids", "mean", "--probes", "4"]
    assert cli_main([*argv, "--cluster-size", "16"]) == 0
    assets = load_assets(out)
    assert assets.stage1 == "centroids" and assets.n_clusters == 64
    rc = cli_main(["convert", str(tiny), str(tmp_path / "x"), "--stage1", "head-int4",
                   "--cluster-size", "16", "--iterations", "2"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--cluster-size, --iterations" in err and "--stage1 centroids" in err
    assert not (tmp_path / "x").exists()
