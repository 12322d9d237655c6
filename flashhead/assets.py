"""FlashHead model assets: read, validate and write the `config.json` keys and the clustering cache.

Layout (compatible with the published FlashHead models):

- `config.json` has `flash_head_cache_dir` (relative to the model folder; an absolute path is
  accepted only if it resolves inside the model folder), optionally `n_probes` (default
  `n_clusters // 16`, at least 1), `flash_head_special_token_ids` (tokens always scored) and
  `n_clusters` (checked against the centroids when present).
- `<cache_dir>/clustering_cache.safetensors` holds `centroids` and `cluster_assignments`.
  Upstream stores centroids as `[d, c]`, sometimes with leading singleton dims (`[1, 1, d, c]`).
  `[c, d]` is accepted too when the shape is unambiguous (see `_orient_centroids`); writing always
  uses upstream's `[d, c]`. `cluster_assignments` is `[V]`, an integer cluster id per token.
- `flash_head_stage1` (optional) says what stage 1 scores: `"centroids"` (the default, upstream's
  format) or `"head_int4"`: every token is its own cluster and stage 1 scores the head's own rows
  quantized to int4 at load time (`flashhead.kernels.int4_rows`). A `head_int4` cache holds only
  `cluster_assignments` (a permutation of the vocabulary); the config must give `hidden_size`.
- Only safetensors is read: pickle-based caches (`.bin`, `.pt`, `.pth`, `.pkl`) are refused,
  because loading them can run arbitrary code.

Unequal cluster sizes: **padded**, within a budget. The cluster-major weight copy has
`n_clusters * max_cluster_size` rows; short clusters get masked slots (token id -1, never scored).
Padding is refused when it would make the copy more than 1/8 larger than the head
(`n_clusters * max_cluster_size > 1.125 * V`), so the copy stays about one head; such a
clustering should be rebuilt with equal cluster sizes (`flashhead convert`, the upstream default
`enforce_equal_cluster_sizes=True`). Empty clusters are refused (a probe spent on one would
score nothing).

Errors are `FlashHeadAssetError`: file, field, expected vs found, and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CACHE_FILE = "clustering_cache.safetensors"
CONFIG_FILE = "config.json"
CACHE_DIR_KEY = "flash_head_cache_dir"
STAGE1_KEY = "flash_head_stage1"
# What stage 1 scores: fitted/mean centroids (int8 at load), or the head's own rows (int4 at load).
STAGE1_KINDS = ("centroids", "head_int4")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
# Padding budget for unequal clusters: the cluster-major copy may have at most this many rows per V.
MAX_PADDED_ROWS_PER_TOKEN = 1.125


class FlashHeadAssetError(ValueError):
    """Bad FlashHead assets. The message names the file, the field, expected vs found, and the fix."""

    def __init__(self, file: Path | str, field_name: str, expected: str, found: str, fix: str):
        self.file = str(file)
        self.field = field_name
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(
            f"{self.file}: {field_name}: expected {expected}, found {found}. Fix: {fix}"
        )


@dataclass
class FlashHeadAssets:
    model_dir: Path
    cache_dir: Path
    centroids: torch.Tensor  # [c, d] float32; [c, 0] with stage1 "head_int4" (no centroids)
    assignments: torch.Tensor  # [V] int64
    n_probes: int
    special_token_ids: list[int] = field(default_factory=list)
    stage1: str = "centroids"  # one of STAGE1_KINDS
    hidden: int | None = None  # the head's width where there are no centroids to tell it

    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.hidden if self.hidden is not None else self.centroids.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.assignments.shape[0])

    def cluster_sizes(self) -> torch.Tensor:
        return torch.bincount(self.assignments, minlength=self.n_clusters)


def is_flashhead_config(cfg: Mapping | None) -> bool:
    """True when a model config asks for FlashHead (has a non-empty `flash_head_cache_dir`)."""
    if not isinstance(cfg, Mapping):
        return False
    value = cfg.get(CACHE_DIR_KEY)
    return isinstance(value, str) and value != ""


def _text_config_value(cfg: Mapping, key: str) -> Any:
    # Multimodal configs nest the language model's sizes under text_config.
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        return text.get(key)
    return None


def _read_config(model_dir: Path) -> dict:
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise FlashHeadAssetError(
            path,
            CONFIG_FILE,
            "a model config file",
            "no such file",
            "point to the model folder that holds config.json",
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FlashHeadAssetError(
            path,
            CONFIG_FILE,
            "valid JSON",
            f"unreadable ({exc})",
            "repair or regenerate config.json",
        ) from exc
    if not isinstance(cfg, dict):
        raise FlashHeadAssetError(
            path, CONFIG_FILE, "a JSON object", type(cfg).__name__, "repair config.json"
        )
    return cfg


def _resolve_cache_dir(model_dir: Path, cfg: Mapping, cfg_file: Path) -> Path:
    raw = cfg.get(CACHE_DIR_KEY)
    if not isinstance(raw, str) or not raw:
        raise FlashHeadAssetError(
            cfg_file,
            CACHE_DIR_KEY,
            "a non-empty string (folder relative to the model folder)",
            repr(raw),
            f'set "{CACHE_DIR_KEY}": "flash_head_assets" or run `flashhead convert`',
        )
    root = model_dir.resolve()
    candidate = Path(raw) if os.path.isabs(raw) else model_dir / raw
    # resolve() follows symlinks, so a link pointing outside the model folder is caught here too.
    resolved = candidate.resolve()
    if resolved != root and root not in resolved.parents:
        raise FlashHeadAssetError(
            cfg_file,
            CACHE_DIR_KEY,
            f"a folder inside the model folder {root}",
            f"{raw!r} -> {resolved}",
            "keep the clustering cache inside the model folder (no '..', no symlinks out of it)",
        )
    if not resolved.is_dir():
        raise FlashHeadAssetError(
            cfg_file,
            CACHE_DIR_KEY,
            "an existing folder",
            f"{raw!r} ({resolved} does not exist)",
            "copy the model's flash_head cache folder next to config.json or fix the key",
        )
    return resolved


def _find_cache_file(cache_dir: Path) -> Path:
    path = cache_dir / CACHE_FILE
    if path.is_file():
        return path
    pickles = sorted(p.name for p in cache_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FlashHeadAssetError(
            cache_dir,
            CACHE_FILE,
            "a safetensors clustering cache",
            f"only pickle-based files {pickles}",
            "pickle files can run code when loaded and are refused; convert them to "
            f"{CACHE_FILE} (keys: centroids, cluster_assignments) in a trusted environment",
        )
    raise FlashHeadAssetError(
        path,
        CACHE_FILE,
        "the clustering cache file",
        "no such file",
        "re-download the model's flash_head cache folder or run `flashhead convert`",
    )


def _orient_centroids(
    raw: torch.Tensor, n_assigned: int, hidden_size: int | None, path: Path
) -> torch.Tensor:
    """Return centroids as [c, d]. Upstream writes [d, c] (maybe [1, 1, d, c]).

    [c, d] is accepted only when unambiguous: with a known hidden size, exactly one axis matches
    it; without one, only the [c, d] reading can hold all assigned cluster ids. Otherwise the
    upstream [d, c] reading wins.
    """
    shape = tuple(raw.shape)
    while raw.dim() > 2 and raw.shape[0] == 1:
        raw = raw[0]
    if raw.dim() != 2 or min(raw.shape) == 0:
        raise FlashHeadAssetError(
            path,
            "centroids",
            "a [d, c] matrix (leading size-1 dims allowed)",
            f"shape {list(shape)}",
            "rewrite the cache with `flashhead convert` (flashhead.assets.write_assets)",
        )
    a, b = int(raw.shape[0]), int(raw.shape[1])
    if hidden_size is not None:
        if a == hidden_size:
            return raw.t()
        if b == hidden_size:
            return raw
        raise FlashHeadAssetError(
            path,
            "centroids",
            f"one axis equal to the model's hidden_size {hidden_size}",
            f"shape {list(shape)}",
            "the cache belongs to another model: rebuild it for this one",
        )
    if b >= n_assigned > a:
        return raw.t()
    if a >= n_assigned > b:
        return raw
    return raw.t()


def load_assets(model_dir: str | os.PathLike, config: Mapping | None = None) -> FlashHeadAssets:
    """Read and validate a model folder's FlashHead assets. Raises FlashHeadAssetError."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg_file = model_dir / CONFIG_FILE
    cfg = dict(config) if config is not None else _read_config(model_dir)
    if not is_flashhead_config(cfg):
        raise FlashHeadAssetError(
            cfg_file,
            CACHE_DIR_KEY,
            "present (a FlashHead model)",
            repr(cfg.get(CACHE_DIR_KEY)),
            "use a FlashHead model, or make one with `flashhead convert`",
        )
    stage1 = cfg.get(STAGE1_KEY, "centroids")
    if stage1 not in STAGE1_KINDS:
        raise FlashHeadAssetError(
            cfg_file,
            STAGE1_KEY,
            " or ".join(repr(k) for k in STAGE1_KINDS),
            repr(stage1),
            f"remove {STAGE1_KEY} (centroids) or rebuild the model with `flashhead convert`",
        )
    cache_dir = _resolve_cache_dir(model_dir, cfg, cfg_file)
    path = _find_cache_file(cache_dir)
    wanted = (
        ("cluster_assignments",) if stage1 == "head_int4" else ("centroids", "cluster_assignments")
    )
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            missing = [k for k in wanted if k not in keys]
            if missing:
                raise FlashHeadAssetError(
                    path,
                    ",".join(missing),
                    " and ".join(f"tensor '{k}'" for k in wanted),
                    f"keys {sorted(keys)}",
                    "rebuild the cache with `flashhead convert`",
                )
            raw_assign = f.get_tensor("cluster_assignments")
            if stage1 == "head_int4":
                raw_centroids = None
            else:
                raw_centroids = f.get_tensor("centroids")
    except FlashHeadAssetError:
        raise
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise FlashHeadAssetError(
            path,
            CACHE_FILE,
            "a readable safetensors file",
            f"unreadable ({exc})",
            "re-download or rebuild the cache",
        ) from exc

    if raw_centroids is not None and not raw_centroids.is_floating_point():
        raise FlashHeadAssetError(
            path,
            "centroids",
            "a floating-point tensor",
            f"dtype {raw_centroids.dtype}",
            "store centroids as float32/bfloat16/float16",
        )
    if raw_assign.is_floating_point() or raw_assign.is_complex() or raw_assign.dtype == torch.bool:
        raise FlashHeadAssetError(
            path,
            "cluster_assignments",
            "an integer tensor",
            f"dtype {raw_assign.dtype}",
            "store one integer cluster id per token (int32/int64)",
        )
    while raw_assign.dim() > 1 and raw_assign.shape[0] == 1:
        raw_assign = raw_assign[0]
    if raw_assign.dim() != 1 or raw_assign.numel() == 0:
        raise FlashHeadAssetError(
            path,
            "cluster_assignments",
            "shape [V] (one id per token)",
            f"shape {list(raw_assign.shape)}",
            "rebuild the cache with `flashhead convert`",
        )
    assignments = raw_assign.to(torch.int64).contiguous()
    vocab = int(assignments.numel())

    cfg_vocab = _text_config_value(cfg, "vocab_size")
    if isinstance(cfg_vocab, int) and cfg_vocab != vocab:
        raise FlashHeadAssetError(
            path,
            "cluster_assignments",
            f"{cfg_vocab} entries (config vocab_size)",
            f"{vocab} entries",
            "the cache belongs to another vocabulary: rebuild it for this model",
        )
    hidden = _text_config_value(cfg, "hidden_size")
    hidden = hidden if isinstance(hidden, int) else None

    n_assigned = int(assignments.max().item()) + 1 if vocab else 0
    if raw_centroids is None:
        _check_head_int4(assignments, hidden, path, cfg_file)
        raw_centroids = torch.empty(n_assigned, 0)
    else:
        raw_centroids = _orient_centroids(raw_centroids, n_assigned, hidden, path)
    centroids = raw_centroids
    centroids = centroids.to(torch.float32).contiguous()
    n_clusters = int(centroids.shape[0])
    if not bool(torch.isfinite(centroids).all()):
        bad = int((~torch.isfinite(centroids)).any(dim=1).sum())
        raise FlashHeadAssetError(
            path,
            "centroids",
            "finite values",
            f"NaN/inf in {bad} of {n_clusters} centroids",
            "rebuild the cache; the clustering run diverged or the file is corrupt",
        )
    lo, hi = int(assignments.min()), int(assignments.max())
    if lo < 0 or hi >= n_clusters:
        raise FlashHeadAssetError(
            path,
            "cluster_assignments",
            f"ids in [0, {n_clusters}) ({n_clusters} centroids)",
            f"ids in [{lo}, {hi}]",
            "rebuild the cache: assignments and centroids disagree",
        )
    cfg_clusters = cfg.get("n_clusters")
    if isinstance(cfg_clusters, int) and cfg_clusters != n_clusters:
        raise FlashHeadAssetError(
            cfg_file,
            "n_clusters",
            f"{n_clusters} (centroids in {path.name})",
            str(cfg_clusters),
            "fix n_clusters in config.json or rebuild the cache",
        )

    sizes = torch.bincount(assignments, minlength=n_clusters)
    if int(sizes.min()) == 0:
        empty = (sizes == 0).nonzero().flatten().tolist()
        raise FlashHeadAssetError(
            path, "cluster_assignments", "every cluster to hold at least one token",
            f"{len(empty)} empty clusters (first ids {empty[:5]})",
            "drop the empty clusters' centroids or rebuild the clustering (`flashhead convert`)",
        )  # fmt: skip
    largest = int(sizes.max())
    if int(sizes.min()) != largest and n_clusters * largest > MAX_PADDED_ROWS_PER_TOKEN * vocab:
        raise FlashHeadAssetError(
            path,
            "cluster_assignments",
            f"equal cluster sizes, or padding to the largest cluster within {MAX_PADDED_ROWS_PER_TOKEN}x V rows",
            f"sizes {int(sizes.min())}..{largest}: {n_clusters} x {largest} = {n_clusters * largest} "
            f"rows for V={vocab}",
            "rebuild the clustering with equal cluster sizes (`flashhead convert`, upstream "
            "enforce_equal_cluster_sizes=True)",
        )

    n_probes = cfg.get("n_probes")
    if n_probes is None:
        n_probes = max(1, n_clusters // 16)
    if (
        isinstance(n_probes, bool)
        or not isinstance(n_probes, int)
        or not 1 <= n_probes <= n_clusters
    ):
        raise FlashHeadAssetError(
            cfg_file,
            "n_probes",
            f"an integer in [1, {n_clusters}]",
            repr(n_probes),
            f"set n_probes in config.json (default n_clusters // 16 = {max(1, n_clusters // 16)})",
        )

    specials = cfg.get("flash_head_special_token_ids")
    specials = _validate_specials(specials, vocab, cfg_file)
    return FlashHeadAssets(
        model_dir=model_dir,
        cache_dir=cache_dir,
        centroids=centroids,
        assignments=assignments,
        n_probes=int(n_probes),
        special_token_ids=specials,
        stage1=stage1,
        hidden=hidden if stage1 == "head_int4" else None,
    )


def _check_head_int4(
    assignments: torch.Tensor, hidden: int | None, path: Path, cfg_file: Path
) -> None:
    """A head_int4 cache: one token per cluster (a permutation of the vocabulary) and a known
    head width (stage 1 quantizes the head's own rows, so no tensor says how wide it is)."""
    vocab = int(assignments.numel())
    if (
        int(assignments.min()) != 0
        or int(assignments.max()) != vocab - 1
        or bool((torch.bincount(assignments, minlength=vocab) != 1).any())
    ):
        raise FlashHeadAssetError(
            path,
            "cluster_assignments",
            f'every token in a cluster of its own ({STAGE1_KEY} "head_int4": ids 0..{vocab - 1}, '
            "each once)",
            f"ids {int(assignments.min())}..{int(assignments.max())} over {vocab} tokens",
            f"rebuild with `flashhead convert --stage1 head-int4`, or drop {STAGE1_KEY}",
        )
    if hidden is None:
        raise FlashHeadAssetError(
            cfg_file,
            "hidden_size",
            f'the head\'s width (an integer; {STAGE1_KEY} "head_int4" stores no centroids)',
            "missing",
            "keep the model's hidden_size in config.json (flashhead convert writes it)",
        )


def _validate_specials(specials: Any, vocab: int, cfg_file: Path) -> list[int]:
    if specials is None:
        return []
    if isinstance(specials, int) and not isinstance(specials, bool):
        specials = [specials]
    if not isinstance(specials, Sequence) or isinstance(specials, str):
        raise FlashHeadAssetError(
            cfg_file,
            "flash_head_special_token_ids",
            "a list of token ids",
            repr(specials),
            "write a JSON list of integers, e.g. [128000, 128001]",
        )
    out: list[int] = []
    for tok in specials:
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
            raise FlashHeadAssetError(
                cfg_file,
                "flash_head_special_token_ids",
                f"integers in [0, {vocab})",
                repr(tok),
                "remove or fix the id (it must be a token of this vocabulary)",
            )
        if tok not in out:
            out.append(tok)
    return sorted(out)


def write_assets(
    model_dir: str | os.PathLike,
    centroids: torch.Tensor | None,
    assignments: torch.Tensor,
    *,
    n_probes: int,
    special_token_ids: Sequence[int] = (),
    cache_dir: str = "flash_head_cache",
    stage1: str = "centroids",
) -> Path:
    """Write `<model_dir>/<cache_dir>/clustering_cache.safetensors` (centroids in upstream's
    [d, c] layout) and set the FlashHead keys in `<model_dir>/config.json`. Returns the cache file.

    `centroids` is [c, d]. With `stage1="head_int4"` it is None and `assignments` puts every
    token in a cluster of its own (no centroids are stored: stage 1 scores the head's rows).
    The result is validated by reading it back with `load_assets`.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    if os.path.isabs(cache_dir) or ".." in Path(cache_dir).parts:
        raise FlashHeadAssetError(
            model_dir / CONFIG_FILE,
            CACHE_DIR_KEY,
            "a folder name relative to the model folder",
            repr(cache_dir),
            "pass a plain relative name such as 'flash_head_cache'",
        )
    if stage1 not in STAGE1_KINDS:
        raise ValueError(f"write_assets: stage1 {stage1!r}: expected one of {STAGE1_KINDS}")
    tensors = {"cluster_assignments": assignments.detach().to(torch.int64).contiguous().cpu()}
    if stage1 == "head_int4":
        if centroids is not None:
            raise ValueError("write_assets: stage1 head_int4 stores no centroids (pass None)")
        c = int(assignments.numel())
    else:
        if centroids is None or centroids.dim() != 2:
            shape = None if centroids is None else list(centroids.shape)
            raise ValueError(f"write_assets: centroids must be [c, d], got {shape}")
        c = int(centroids.shape[0])
        tensors["centroids"] = centroids.detach().to(torch.float32).t().contiguous().cpu()
    folder = model_dir / cache_dir
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CACHE_FILE
    save_file(tensors, str(target), metadata={"format": "pt", "layout": "centroids[d,c]"})
    cfg_path = model_dir / CONFIG_FILE
    cfg = _read_config(model_dir) if cfg_path.exists() else {}
    cfg[CACHE_DIR_KEY] = cache_dir
    cfg["n_probes"] = int(n_probes)
    cfg["n_clusters"] = c
    cfg["flash_head_special_token_ids"] = sorted({int(t) for t in special_token_ids})
    if stage1 == "centroids":
        cfg.pop(STAGE1_KEY, None)  # upstream's format: readable by every FlashHead loader
    else:
        cfg[STAGE1_KEY] = stage1
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    load_assets(model_dir)  # fail at write time, not at serve time
    return target


__all__ = [
    "CACHE_FILE",
    "STAGE1_KINDS",
    "FlashHeadAssetError",
    "FlashHeadAssets",
    "is_flashhead_config",
    "load_assets",
    "write_assets",
]
