"""How stable is `--probes auto`? Rank arrays for several benign perturbations of one conversion.

    python scripts/probe_rule_study.py MODEL_DIR OUT_DIR [--variants N]

MODEL_DIR is a FlashHead (or plain HF) folder. For each variant (k-means seed, or a random 90 %
of the calibration windows), this fits clusters and centroids exactly as `flashhead convert`
does and saves, to OUT_DIR/variant-K.pt:
  - the left-out-source ranks of every calibration row (what `--probes auto` reads),
  - the rank of the dense top-1 cluster on each never-seen evaluation family, fitted on all rows.
The hidden states (calibration and evaluation) are computed once and cached in OUT_DIR. The
analysis of the rules on these arrays is `scripts/probe_rule_compare.py`. Measurement only: no
conversion reads these files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flashhead.assets import load_assets
from flashhead.calibration.model import load_model
from flashhead.calibration.ranks import cluster_ranks, dense_topk
from flashhead.convert.clustering import KMeansOptions, balanced_kmeans, centroids_for
from flashhead.convert.fit import (
    Calibration,
    _solve_normal,
    cluster_max_logits,
    fit_groups,
    left_out_ranks,
    normal_equations,
    sample_calibration,
    whitening,
)
from flashhead.evaluation import family_hidden_states
from flashhead.head import quantize_centroids
from flashhead.kernels.reference import probe_keys

EVAL_FAMILIES = ("qa", "markdown", "docstrings", "chat")
_BLOCK = 256


def ranks_of(h, cent, assignments, top1, specials):
    q, scale = quantize_centroids(cent)
    qf = q.float()
    out = torch.empty(h.shape[0], dtype=torch.int64)
    for s in range(0, h.shape[0], _BLOCK):
        keys = probe_keys(h[s : s + _BLOCK], qf, scale)
        out[s : s + _BLOCK] = cluster_ranks(
            keys, assignments, top1[s : s + _BLOCK, None], specials
        )[:, 0]
    return out


def cached(path: Path, make):
    if path.exists():
        return torch.load(path)
    value = make()
    torch.save(value, path)
    return value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--variants", type=int, default=6)
    ap.add_argument("--cluster-size", type=int, default=4)
    a = ap.parse_args()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = load_assets(a.model_dir).special_token_ids

    def calib():
        c = sample_calibration(a.model_dir, prose_tokens=4096, chat_tokens=4096, code_tokens=4096)
        return {"h": c.h, "source": c.source}

    cal = cached(out / "calibration.pt", calib)

    def evals():
        model, tok = load_model(a.model_dir, dtype=torch.bfloat16)
        res = {}
        for fam in EVAL_FAMILIES:
            h, _ = family_hidden_states(model, tok, fam, n_tokens=4096)
            res[fam] = h.float()
        res["weight"] = model.get_output_embeddings().weight.detach().float()
        return res

    ev = cached(out / "evaluation.pt", evals)
    w = ev["weight"]
    tops = {f: dense_topk(ev[f], w, k=1)[:, 0] for f in EVAL_FAMILIES}
    h_all, src_all = cal["h"].float(), cal["source"]
    n = h_all.shape[0]
    for k in range(a.variants):
        path = out / f"variant-{k}.pt"
        if path.exists():
            continue
        t0 = time.monotonic()
        # Even variants: the whole calibration, k-means seed k // 2. Odd: a random 90 % of the
        # 32-row windows, seed 0.
        if k % 2:
            g = torch.Generator().manual_seed(k)
            blocks = torch.arange(n) // 32
            keep_b = torch.rand(int(blocks.max()) + 1, generator=g) >= 0.1
            keep = keep_b[blocks]
            seed = 0
        else:
            keep = torch.ones(n, dtype=torch.bool)
            seed = k // 2
        h, src = h_all[keep], src_all[keep]
        opts = KMeansOptions(cluster_size=a.cluster_size, seed=seed, metric="euclidean",
                             progress=False)  # fmt: skip
        assignments = balanced_kmeans(w @ whitening(h), opts)
        mean = centroids_for(w, assignments, "mean")
        max_logits, top1 = cluster_max_logits(h, w, assignments)
        normal = normal_equations(h, max_logits, fit_groups(src))
        lofo = left_out_ranks(Calibration(h, src), w, assignments, specials,
                              targets=(max_logits, top1), normal=normal)  # fmt: skip
        full = _solve_normal(*normal, mean, 1e-2)
        held = {f: ranks_of(ev[f], full, assignments, tops[f], specials) for f in EVAL_FAMILIES}
        torch.save({"keep": keep, "source": src, "lofo": lofo, "held": held,
                    "seed": seed, "n_clusters": int(assignments.max()) + 1}, path)  # fmt: skip
        print(f"variant {k}: {time.monotonic() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
