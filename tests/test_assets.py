"""flashhead.assets: round trips with the upstream layout and one test per bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flashhead.assets import (
    CACHE_FILE,
    FlashHeadAssetError,
    is_flashhead_config,
    load_assets,
    write_assets,
)

V, D, C = 64, 8, 16  # 16 clusters of 4 tokens


def make_model(
    tmp_path: Path,
    centroids: torch.Tensor | None = None,
    assignments: torch.Tensor | None = None,
    config: dict | None = None,
    cache_dir: str = "flash_head_assets",
) -> Path:
    """A model folder in upstream's layout: centroids stored [1, 1, d, c]."""
    gen = torch.Generator().manual_seed(0)
    if centroids is None:
        centroids = torch.randn(1, 1, D, C, generator=gen)
    if assignments is None:
        assignments = torch.randperm(V, generator=gen) % C
    (tmp_path / cache_dir).mkdir(parents=True, exist_ok=True)
    tensors = {"centroids": centroids, "cluster_assignments": assignments}
    save_file(tensors, str(tmp_path / cache_dir / CACHE_FILE))
    cfg = {"flash_head_cache_dir": cache_dir, "vocab_size": V, "hidden_size": D}
    cfg.update(config or {})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def expect_error(tmp_path: Path, field: str, *fragments: str) -> FlashHeadAssetError:
    with pytest.raises(FlashHeadAssetError) as info:
        load_assets(tmp_path)
    err = info.value
    assert err.field == field, str(err)
    for frag in fragments:
        assert frag in str(err), str(err)
    assert "Fix:" in str(err)
    return err


def test_is_flashhead_config():
    assert is_flashhead_config({"flash_head_cache_dir": "x"})
    assert not is_flashhead_config({"flash_head_cache_dir": ""})
    assert not is_flashhead_config({"vocab_size": 3})
    assert not is_flashhead_config(None)


def test_load_upstream_layout(tmp_path):
    cent = torch.randn(1, 1, D, C)
    assign = torch.arange(V) % C
    make_model(tmp_path, cent, assign, {"n_probes": 3, "flash_head_special_token_ids": [5, 1, 5]})
    a = load_assets(tmp_path)
    assert a.centroids.shape == (C, D) and a.centroids.dtype == torch.float32
    torch.testing.assert_close(a.centroids, cent[0, 0].t())
    assert a.assignments.dtype == torch.int64 and torch.equal(a.assignments, assign)
    assert a.n_probes == 3
    assert a.special_token_ids == [1, 5]
    assert a.cache_dir == (tmp_path / "flash_head_assets").resolve()


def test_default_n_probes_is_c_over_16(tmp_path):
    make_model(tmp_path, torch.randn(D, 64), torch.arange(V) % 64)
    assert load_assets(tmp_path).n_probes == 4


def test_write_then_load_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": V, "architectures": ["X"]}))
    cent = torch.randn(C, D)
    assign = torch.randperm(V) % C
    path = write_assets(tmp_path, cent, assign, n_probes=2, special_token_ids=[7, 3])
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert tuple(f.get_tensor("centroids").shape) == (D, C)  # upstream layout on disk
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["X"]  # other keys kept
    assert cfg["flash_head_cache_dir"] == "flash_head_cache"
    a = load_assets(tmp_path)
    torch.testing.assert_close(a.centroids, cent)
    assert torch.equal(a.assignments, assign)
    assert a.n_probes == 2 and a.special_token_ids == [3, 7]


def test_cd_layout_accepted_when_unambiguous(tmp_path):
    cent = torch.randn(C, D)
    make_model(tmp_path, cent, torch.arange(V) % C)
    torch.testing.assert_close(load_assets(tmp_path).centroids, cent)


def test_cd_layout_without_hidden_size_uses_assignments(tmp_path):
    cent = torch.randn(C, D)
    make_model(tmp_path, cent, torch.arange(V) % C)
    cfg = {"flash_head_cache_dir": "flash_head_assets"}
    torch.testing.assert_close(load_assets(tmp_path, cfg).centroids, cent)


def test_unequal_clusters_over_budget_refused(tmp_path):
    assign = torch.arange(V) % C
    assign[0] = 1  # cluster 0 has 3 tokens, cluster 1 has 5: 16 * 5 = 80 rows > 1.125 * 64
    make_model(tmp_path, None, assign)
    expect_error(tmp_path, "cluster_assignments", "equal cluster sizes", "80 rows")


def test_unequal_clusters_small_padding_ok(tmp_path):
    assign = torch.arange(V) % 8  # 8 clusters of 8
    assign[0] = 1  # sizes 7 and 9: 8 * 9 = 72 rows <= 1.125 * 64
    make_model(tmp_path, torch.randn(D, 8), assign)
    a = load_assets(tmp_path)
    assert int(a.cluster_sizes().max()) == 9


def test_missing_config(tmp_path):
    expect_error(tmp_path, "config.json", "no such file")


def test_config_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{nope")
    expect_error(tmp_path, "config.json", "valid JSON")


def test_not_a_flashhead_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3}))
    expect_error(tmp_path, "flash_head_cache_dir", "flashhead convert")


def test_cache_dir_escapes_with_dotdot(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    make_model(tmp_path, cache_dir="outside")
    (model / "config.json").write_text(json.dumps({"flash_head_cache_dir": "../outside"}))
    expect_error(model, "flash_head_cache_dir", "inside the model folder")


def test_cache_dir_escapes_with_symlink(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    make_model(tmp_path, cache_dir="outside")
    (model / "flash_head_assets").symlink_to(tmp_path / "outside")
    (model / "config.json").write_text(json.dumps({"flash_head_cache_dir": "flash_head_assets"}))
    expect_error(model, "flash_head_cache_dir", "symlinks")


def test_cache_dir_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"flash_head_cache_dir": "nope"}))
    expect_error(tmp_path, "flash_head_cache_dir", "does not exist")


def test_cache_file_missing(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"flash_head_cache_dir": "assets"}))
    expect_error(tmp_path, CACHE_FILE, "no such file")


def test_pickle_cache_refused(tmp_path):
    (tmp_path / "assets").mkdir()
    torch.save({"centroids": torch.zeros(2, 2)}, tmp_path / "assets" / "clustering_cache.pt")
    (tmp_path / "config.json").write_text(json.dumps({"flash_head_cache_dir": "assets"}))
    expect_error(tmp_path, CACHE_FILE, "pickle", "clustering_cache.pt")


def test_missing_tensor_key(tmp_path):
    make_model(tmp_path)
    save_file({"centroids": torch.randn(D, C)}, str(tmp_path / "flash_head_assets" / CACHE_FILE))
    expect_error(tmp_path, "cluster_assignments", "keys ['centroids']")


def test_corrupt_cache_file(tmp_path):
    make_model(tmp_path)
    (tmp_path / "flash_head_assets" / CACHE_FILE).write_bytes(b"garbage")
    expect_error(tmp_path, CACHE_FILE, "readable safetensors")


def test_centroids_integer_dtype(tmp_path):
    make_model(tmp_path, centroids=torch.ones(D, C, dtype=torch.int32))
    expect_error(tmp_path, "centroids", "floating-point", "int32")


def test_assignments_float_dtype(tmp_path):
    make_model(tmp_path, assignments=(torch.arange(V) % C).float())
    expect_error(tmp_path, "cluster_assignments", "integer", "float32")


def test_centroids_wrong_rank(tmp_path):
    make_model(tmp_path, centroids=torch.randn(2, D, C))
    expect_error(tmp_path, "centroids", "shape [2, 8, 16]")


def test_centroids_wrong_hidden(tmp_path):
    make_model(tmp_path, centroids=torch.randn(D + 1, C))
    expect_error(tmp_path, "centroids", "hidden_size 8")


def test_assignments_wrong_shape(tmp_path):
    make_model(tmp_path, assignments=(torch.arange(V) % C).view(8, 8))
    expect_error(tmp_path, "cluster_assignments", "shape [8, 8]")


def test_vocab_mismatch(tmp_path):
    make_model(tmp_path, config={"vocab_size": V + 1})
    expect_error(tmp_path, "cluster_assignments", f"{V + 1} entries", f"found {V} entries")


def test_non_finite_centroids(tmp_path):
    cent = torch.randn(D, C)
    cent[2, 3] = float("nan")
    make_model(tmp_path, centroids=cent)
    expect_error(tmp_path, "centroids", "finite", "1 of 16")


def test_ids_out_of_range(tmp_path):
    assign = torch.arange(V) % C
    assign[3] = C
    make_model(tmp_path, assignments=assign)
    expect_error(tmp_path, "cluster_assignments", "[0, 16)", "[0, 16]")


def test_negative_ids(tmp_path):
    assign = torch.arange(V) % C
    assign[3] = -1
    make_model(tmp_path, assignments=assign)
    expect_error(tmp_path, "cluster_assignments", "[-1, 15]")


def test_n_clusters_mismatch(tmp_path):
    make_model(tmp_path, config={"n_clusters": 5})
    expect_error(tmp_path, "n_clusters", "16")


@pytest.mark.parametrize("bad", [0, C + 1, "4", 2.5, True])
def test_n_probes_out_of_range(tmp_path, bad):
    make_model(tmp_path, config={"n_probes": bad})
    expect_error(tmp_path, "n_probes", "[1, 16]")


@pytest.mark.parametrize("bad", [[V], [-1], ["3"], "3"])
def test_bad_special_tokens(tmp_path, bad):
    make_model(tmp_path, config={"flash_head_special_token_ids": bad})
    expect_error(tmp_path, "flash_head_special_token_ids")


def test_write_refuses_escaping_cache_dir(tmp_path):
    with pytest.raises(FlashHeadAssetError, match="relative"):
        write_assets(tmp_path, torch.randn(C, D), torch.arange(V) % C, n_probes=1, cache_dir="../x")


def test_empty_cluster_refused(tmp_path):
    assign = torch.arange(V) % C
    assign[assign == 3] = 4  # cluster 3 has no tokens left
    make_model(tmp_path, assignments=assign)
    expect_error(tmp_path, "cluster_assignments", "1 empty clusters", "[3]")
