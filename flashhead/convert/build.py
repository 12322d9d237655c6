"""`convert()`: source model -> FlashHead model folder, atomically.

The folder is built in a hidden sibling temp dir and renamed into place at the end, so an
interrupted run (Ctrl-C, crash) leaves OUT untouched: either absent, or the old folder with --force.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashhead.assets import write_assets
from flashhead.convert.clustering import KMeansOptions, balanced_kmeans, centroids_for
from flashhead.convert.fit import (
    auto_probes,
    cluster_max_logits,
    cross_validated_probes,
    fit_centroids,
    fit_groups,
    normal_equations,
    sample_calibration,
    whitening,
)
from flashhead.convert.source import (
    ConvertError,
    SourceModel,
    flashhead_architecture,
    open_source,
)

CACHE_DIR = "flash_head_cache"
STAGE1_CHOICES = ("centroids", "head-int4")
# --stage1 head-int4 without --probes: tokens scored exactly per row. Measured (docs/convert.md,
# 2026-12-07): the dense top-1 ranked at most 41st under the int4 scores on every held-out family
# of SmolLM2-135M; 512 leaves a wide margin for text unlike any measured, at ~1 % of V.
HEAD_INT4_PROBES = 512


@dataclass
class ConvertOptions:
    # 4, not upstream's 16: measured in docs/convert.md, at the same share of V scored small
    # clusters keep whole greedy answers (60/60 held-out questions on both shipped models,
    # against 40-50/60 with 16); the centroids cost more to score (V/4 int8 rows).
    cluster_size: int = 4
    # What stage 1 scores: every row of the head at int4 ("head-int4": clusters of one token, no
    # calibration, no centroids stored), or int8 centroids of clusters ("centroids": the fields
    # below). Measured in docs/convert.md (2026-12-07): the centroids, fitted to calibration
    # text, miss rare names on text unlike it; int4 rows rank the dense top-1 within the first
    # 16 tokens on every held-out family.
    stage1: str = "head-int4"
    probes: int | None = None  # None: auto with --centroids fit, else n_clusters // 16
    centroids: str = "fit"  # fit | mean | normalized (see flashhead.convert.fit)
    calibration_tokens: int = 4096  # prose positions sampled (--centroids fit)
    chat_tokens: int = 4096  # positions of the model's own chat answers (--centroids fit)
    code_tokens: int = 4096  # positions of stdlib source code (--centroids fit)
    sample_tokens: int = 0  # positions of the model's own samples at temperature 1 (opt-in)
    answer_tokens: int = 32  # longest chat answer generated per calibration prompt
    calibration_text: str | None = None  # None: the stdlib calibration text
    # --probes auto: top-1 agreement to reach, per source. 99.9%: a 48-token greedy answer then
    # stays whole with probability 0.999^48 = 95% (at 99.5% only 79%).
    target_agreement: float = 0.999
    probe_margin: float = 1.0  # --probes auto: the left-out-source p times this
    max_share: float = 0.10  # --probes auto: never score more than this share of V
    seed: int = 0
    iterations: int = 8
    special_tokens: Sequence[int] | None = None  # None: the tokenizer's special/eos/bos ids
    force: bool = False
    device: str | None = None
    progress: bool = True
    extra_config: dict = field(default_factory=dict)


@dataclass
class ConvertResult:
    out: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    n_clusters: int
    n_probes: int
    special_token_ids: list[int]
    seconds: dict[str, float]
    # --probes auto: cross-validated p per calibration source reaching the target agreement
    probe_estimates: dict[str, int] = field(default_factory=dict)
    probes_capped: bool = False  # --probes auto hit max_share before the target x margin


def _log(msg: str, enabled: bool) -> None:
    if enabled:
        print(f"flashhead convert: {msg}", file=sys.stderr, flush=True)


def check_output(src: Path, out: Path, force: bool) -> None:
    """Refuse to clobber: a non-empty OUT needs --force, and OUT may never hold SRC."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or out_r in src_r.parents or src_r in out_r.parents:
        raise ConvertError(
            f"{out}: the output folder overlaps the source {src}. Fix: choose another OUT"
        )
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: exists and is not a folder. Fix: choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(
            f"{out}: exists and is not empty. Fix: pass --force to replace it, or choose another OUT"
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A hidden sibling temp folder that becomes OUT when the block ends; on any error or
    interrupt it is removed and OUT stays as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; OUT should look like mkdir's
        yield tmp
        _fix_file_modes(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fix_file_modes(folder: Path) -> None:
    # safetensors writes 0600 files; a model folder is meant to be read by other users (servers).
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and path.stat().st_nlink == 1:  # leave hard-linked source files alone
            os.chmod(path, mode)
        elif path.is_dir():
            os.chmod(path, 0o777 & ~_umask())


def _write_config(source: SourceModel, tmp: Path, extra: dict) -> str:
    cfg = dict(source.config)
    arch = flashhead_architecture(source.architecture)
    cfg["architectures"] = [arch]
    for key in ("flash_head_cache_dir", "n_probes", "n_clusters", "flash_head_special_token_ids"):
        cfg.pop(key, None)
    cfg.update(extra)
    # A fresh file, never the source's (which may be hard-linked): write_assets edits it in place.
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return arch


def convert(src: str | os.PathLike, out: str | os.PathLike, opts: ConvertOptions) -> ConvertResult:
    src, out = Path(src), Path(out)
    if opts.stage1 not in STAGE1_CHOICES:
        raise ConvertError(f"--stage1 {opts.stage1!r}: expected {' or '.join(STAGE1_CHOICES)}")
    check_output(src, out, opts.force)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    _log(f"reading {src}", opts.progress)
    source = open_source(src)
    seconds["load"] = time.monotonic() - t0
    weight = source.head_weight
    vocab, hidden = int(weight.shape[0]), int(weight.shape[1])
    if opts.stage1 == "head-int4":
        return _convert_head_int4(src, out, source, opts, seconds, t0)
    if opts.cluster_size < 1 or vocab % opts.cluster_size:
        raise ConvertError(
            f"{src}: the head has {vocab} rows, not a multiple of --cluster-size "
            f"{opts.cluster_size}. Fix: pick a cluster size that divides {vocab}"
        )
    n_clusters = vocab // opts.cluster_size
    if opts.centroids not in ("fit", "mean", "normalized"):
        raise ConvertError(f"--centroids {opts.centroids!r}: expected fit, mean or normalized")
    auto_probes_wanted = opts.probes is None and opts.centroids == "fit"
    n_probes = opts.probes if opts.probes is not None else max(1, n_clusters // 16)
    if not 1 <= n_probes <= n_clusters:
        raise ConvertError(f"--probes {n_probes}: expected 1..{n_clusters} (number of clusters)")
    specials = _special_ids(source, opts, vocab)
    _log(
        f"{source.architecture}: V={vocab}, d={hidden}, {n_clusters} clusters of "
        f"{opts.cluster_size}, centroids: {opts.centroids}, probes: "
        f"{'auto' if auto_probes_wanted else n_probes}",
        opts.progress,
    )

    w32 = weight.float()
    kmeans = KMeansOptions(
        cluster_size=opts.cluster_size,
        iterations=opts.iterations,
        seed=opts.seed,
        device=opts.device,
        progress=opts.progress,
    )
    estimates: dict[str, int] = {}
    capped = False
    with _staged(out) as tmp:
        t1 = time.monotonic()
        source.materialize(tmp)
        arch = _write_config(source, tmp, opts.extra_config)
        seconds["write"] = time.monotonic() - t1
        if opts.centroids == "fit":
            t2 = time.monotonic()
            # The written folder is a plain HF model (bf16): faster to run than a GGUF one.
            cal = sample_calibration(
                src if source.kind == "hf" else tmp,
                prose_tokens=opts.calibration_tokens,
                chat_tokens=opts.chat_tokens,
                code_tokens=opts.code_tokens,
                sample_tokens=opts.sample_tokens,
                text=opts.calibration_text,
                answer_tokens=opts.answer_tokens,
                progress=opts.progress,
            )
            seconds["calibrate"] = time.monotonic() - t2
            t3 = time.monotonic()
            kmeans = dataclasses.replace(kmeans, metric="euclidean")
            assignments = balanced_kmeans(w32 @ whitening(cal.h), kmeans)
            seconds["cluster"] = time.monotonic() - t3
            t4 = time.monotonic()
            targets = cluster_max_logits(cal.h, w32, assignments)
            normal = normal_equations(cal.h, targets[0], fit_groups(cal.source))
            centroids = fit_centroids(cal.h, w32, assignments, normal=normal)
            if auto_probes_wanted:
                estimates = cross_validated_probes(
                    cal,
                    w32,
                    assignments,
                    specials,
                    opts.target_agreement,
                    targets=targets,
                    normal=normal,
                )
                if not estimates:
                    raise ConvertError(
                        "the calibration gave too few positions to choose --probes "
                        f"({cal.h.shape[0]}). Fix: pass a longer --calibration-text or set --probes"
                    )
                n_probes, capped = auto_probes(
                    estimates, n_clusters, opts.cluster_size, opts.probe_margin, opts.max_share
                )
                found = ", ".join(f"{k} p >= {v}" for k, v in estimates.items())
                _log(
                    f"n_probes {n_probes}: top-1 agreement {100 * opts.target_agreement:g}% on "
                    f"each calibration source, centroids fitted without it, needs (90% upper bound) {found}"
                    + (f"; x{opts.probe_margin:g}" if opts.probe_margin != 1.0 else "")
                    + (
                        f", capped at {100 * opts.max_share:g}% of the vocabulary" if capped else ""
                    ),
                    opts.progress,
                )
            seconds["fit"] = time.monotonic() - t4
        else:
            t3 = time.monotonic()
            assignments = balanced_kmeans(w32, kmeans)
            centroids = centroids_for(w32, assignments, opts.centroids)
            seconds["cluster"] = time.monotonic() - t3
        t5 = time.monotonic()
        write_assets(
            tmp,
            centroids,
            assignments,
            n_probes=n_probes,
            special_token_ids=specials,
            cache_dir=CACHE_DIR,
        )
        seconds["write"] += time.monotonic() - t5
    seconds["total"] = time.monotonic() - t0
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total")
    _log(f"wrote {out} in {seconds['total']:.1f} s ({phases})", opts.progress)
    return ConvertResult(
        out=out,
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        n_clusters=n_clusters,
        n_probes=n_probes,
        special_token_ids=list(specials),
        seconds=seconds,
        probe_estimates=estimates,
        probes_capped=capped,
    )


def _special_ids(source: SourceModel, opts: ConvertOptions, vocab: int) -> list[int]:
    specials = (
        sorted({int(t) for t in opts.special_tokens})
        if opts.special_tokens is not None
        else source.special_token_ids
    )
    bad = [t for t in specials if not 0 <= t < vocab]
    if bad:
        raise ConvertError(
            f"--special-tokens {bad}: not token ids of this vocabulary (0..{vocab - 1})"
        )
    return specials


def _convert_head_int4(
    src: Path,
    out: Path,
    source: SourceModel,
    opts: ConvertOptions,
    seconds: dict[str, float],
    t0: float,
) -> ConvertResult:
    """--stage1 head-int4: every token is its own cluster; stage 1 scores the head's rows at
    int4, quantized when the model loads. Nothing is fitted, so no calibration text is read."""
    from flashhead.kernels.int4_rows import int4_group_size

    vocab, hidden = (int(x) for x in source.head_weight.shape)
    try:
        int4_group_size(hidden)
    except ValueError as exc:
        raise ConvertError(
            f"{src}: --stage1 head-int4: {exc}. Fix: use --stage1 centroids"
        ) from exc
    n_probes = opts.probes if opts.probes is not None else min(HEAD_INT4_PROBES, vocab)
    if not 1 <= n_probes <= vocab:
        raise ConvertError(f"--probes {n_probes}: expected 1..{vocab} (one cluster per token)")
    specials = _special_ids(source, opts, vocab)
    _log(
        f"{source.architecture}: V={vocab}, d={hidden}, stage 1: the head's rows at int4 "
        f"(clusters of 1), probes: {n_probes} tokens",
        opts.progress,
    )
    t1 = time.monotonic()
    with _staged(out) as tmp:
        source.materialize(tmp)
        arch = _write_config(source, tmp, opts.extra_config)
        write_assets(
            tmp,
            None,
            torch.arange(vocab),
            n_probes=n_probes,
            special_token_ids=specials,
            cache_dir=CACHE_DIR,
            stage1="head_int4",
        )
    seconds["write"] = time.monotonic() - t1
    seconds["total"] = time.monotonic() - t0
    _log(f"wrote {out} in {seconds['total']:.1f} s", opts.progress)
    return ConvertResult(
        out=out,
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        n_clusters=vocab,
        n_probes=n_probes,
        special_token_ids=list(specials),
        seconds=seconds,
    )
