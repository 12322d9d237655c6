"""How many clusters to probe, from the ranks of the dense top-1 cluster on left-out positions.

`--probes auto` aims at a top-1 agreement of 99.9 %: the 99.9 % quantile of the rank of the
cluster that holds the dense head's top-1 token. Over 4096 positions that quantile is the 5th
worst rank, so it moves with the few hardest positions (docs/convert.md, "How stable is the
left-out estimate?"). `--probes auto` uses `block_bootstrap`, a 90 % upper confidence bound;
`point` and `tail_fit` are kept for `scripts/probe_rule_compare.py`, which measured all three over
k-means seeds and calibration subsets (docs/convert.md, "A probe count that holds").
"""

from __future__ import annotations

import math

import torch

from flashhead.calibration.ranks import probes_for


def point(ranks: torch.Tensor, target: float = 0.999) -> int:
    """The empirical quantile: the smallest p reaching `target` on these positions."""
    return probes_for(ranks, target) or 1


def block_bootstrap(
    ranks: torch.Tensor,
    target: float = 0.999,
    *,
    block: int = 32,
    resamples: int = 400,
    level: float = 0.9,
    seed: int = 0,
) -> int:
    """The `level` quantile of `point` over resamples of whole `block`-row runs (rows of one
    answer or one text window are adjacent, and their ranks are correlated)."""
    r = ranks.clamp_min(-1)
    n_blocks = math.ceil(r.numel() / block)
    pad = torch.full((n_blocks * block - r.numel(),), -2, dtype=r.dtype)
    blocks = torch.cat([r, pad]).view(n_blocks, block)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(n_blocks, (resamples, n_blocks), generator=g)
    out = []
    for row in picks:
        sample = blocks[row].flatten()
        out.append(point(sample[sample > -2], target))
    return int(torch.tensor(out, dtype=torch.float64).quantile(level).ceil())


def tail_fit(ranks: torch.Tensor, target: float = 0.999, *, tail: float = 0.02) -> int:
    """Weissman's extreme-quantile estimate from the Hill tail index of the top `tail` share of
    the ranks: it reads about 80 of 4096 positions instead of the 5th worst one."""
    x = (ranks.clamp_min(0) + 1).double().sort(descending=True).values
    k = max(8, int(tail * x.numel()))
    if k >= x.numel():
        return point(ranks, target)
    threshold = x[k]
    hill = float((x[:k].log() - threshold.log()).mean())
    q = float(threshold) * (k / (x.numel() * (1 - target))) ** hill
    return max(1, math.ceil(q))


RULES = {
    "point": point,
    "bootstrap90": block_bootstrap,
    "tail": tail_fit,
}
