"""Where the dense head's top tokens rank among the stage-1 cluster scores, and the probe count
a target agreement needs: what convert's probe rule and `flashhead eval` both measure."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROW_BLOCK = 256  # hidden states per dense-logits block: [256, 262144] fp32 = 256 MiB


@dataclass
class Ranks:
    """Per hidden state: the stage-1 rank of the clusters holding the dense top-5 tokens
    (0 = best; -1 = always scored, a special token)."""

    top1: torch.Tensor  # [N] int64
    top5: torch.Tensor  # [N, 5] int64


def dense_topk(h: torch.Tensor, weight: torch.Tensor, k: int = 5) -> torch.Tensor:
    """[N, k] token ids of the dense head's top-k logits (fp32)."""
    w = weight.float()
    out = []
    for start in range(0, h.shape[0], ROW_BLOCK):
        logits = h[start : start + ROW_BLOCK].float() @ w.T
        out.append(logits.topk(k, dim=1).indices)
    return torch.cat(out)


def cluster_ranks(
    stage1_scores: torch.Tensor,
    assignments: torch.Tensor,
    top: torch.Tensor,
    specials: Sequence[int],
) -> torch.Tensor:
    """[N, k] rank of each token's cluster among the row's stage 1 scores (-1 for specials).

    Ties count against the token (a cluster scoring equal to it may be picked first)."""
    clusters = assignments[top]  # [N, k]
    own = stage1_scores.gather(1, clusters)  # [N, k]
    ranks = (stage1_scores.unsqueeze(1) > own.unsqueeze(2)).sum(dim=2)
    ties = (stage1_scores.unsqueeze(1) == own.unsqueeze(2)).sum(dim=2) - 1
    ranks = ranks + ties
    if len(specials):
        special = torch.isin(top, torch.tensor(list(specials), dtype=top.dtype))
        ranks = torch.where(special, torch.full_like(ranks, -1), ranks)
    return ranks


def probes_for(ranks_top1: torch.Tensor, target: float) -> int | None:
    """Smallest p with P(rank < p) >= target, i.e. the p needed for that top-1 agreement."""
    n = ranks_top1.numel()
    need = math.ceil(target * n - 1e-9)
    if need <= 0:
        return 1
    r = ranks_top1.clamp_min(-1).sort().values
    p = int(r[need - 1].item()) + 1
    return max(p, 1)


def agreement_at(ranks: torch.Tensor, p: int) -> float:
    """Share of entries whose cluster is among the top p (exact count, not a float32 mean)."""
    return int((ranks < p).sum()) / max(1, ranks.numel())
