"""Balanced spherical k-means: every cluster gets exactly `cluster_size` rows.

FlashHead's kernels load one contiguous `cluster_size x d` tile per probed cluster, so the balance
is a hard requirement, not a preference. The assignment step is capacity-constrained: rows propose
to their nearest centroids in order and each cluster keeps the best-scoring `cluster_size`
proposals (deferred acceptance, i.e. a stable matching), vectorized in torch.

Large vocabularies (Gemma-3: 262144 rows, 16384 clusters) make a flat k-means step cost
V * c * d multiply-adds (~2.7 TFLOP, ~25 s per iteration on 2 cores), so above `flat_max_clusters`
the clustering is two-level: balanced groups first, then balanced clusters inside each group.
Everything is deterministic for a seed on a given device and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashhead.convert.progress import Progress

# Elements of one [rows, clusters] score block; bounds the scratch memory (bf16: 64 MiB).
_SCORE_BLOCK_ELEMS = 1 << 25


@dataclass(frozen=True)
class KMeansOptions:
    cluster_size: int = 16
    iterations: int = 8
    candidates: int = 16  # nearest centroids each row may propose to per assignment step
    seed: int = 0
    flat_max_clusters: int = 4096
    device: str | None = None  # None: CUDA when available, else CPU (all cores)
    progress: bool = True


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _score_dtype(device: torch.device) -> torch.dtype:
    # bf16 GEMMs are ~2.7x faster than fp32 on AVX-512-BF16 CPUs and on GPUs; the scores only
    # rank centroids for the assignment, where bf16 rounding does not matter.
    return torch.bfloat16


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _top_candidates(
    x: torch.Tensor, centroids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the k highest-scoring centroid ids (descending) and their scores (fp32)."""
    k = min(k, centroids.shape[0])
    dtype = _score_dtype(x.device)
    c = centroids.to(dtype)
    block = max(1, _SCORE_BLOCK_ELEMS // max(1, centroids.shape[0]))
    ids = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
    scores = torch.empty(x.shape[0], k, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], block):
        s = x[start : start + block].to(dtype) @ c.T
        v, i = s.float().topk(k, dim=1)
        ids[start : start + block] = i
        scores[start : start + block] = v
    return ids, scores


def assign_with_capacity(
    cand_ids: torch.Tensor, cand_scores: torch.Tensor, capacity: torch.Tensor
) -> torch.Tensor:
    """Stable matching of rows to clusters: rows propose along their candidate lists (best first),
    each cluster holds the `capacity[c]` best proposals seen so far and bumps the rest.

    Returns [N] int64 cluster per row, -1 where a row was rejected by all its candidates.
    """
    n, k = cand_ids.shape
    device = cand_ids.device
    assign = torch.full((n,), -1, dtype=torch.int64, device=device)
    held_score = torch.full((n,), -math.inf, dtype=torch.float32, device=device)
    ptr = torch.zeros(n, dtype=torch.int64, device=device)
    rows = torch.arange(n, device=device)
    for _ in range(n * k + 1):  # each round advances at least one pointer; this bound is never hit
        active = (assign < 0) & (ptr < k)
        if not bool(active.any()):
            break
        a = rows[active]
        prop_c = cand_ids[a, ptr[a]]
        prop_s = cand_scores[a, ptr[a]]
        ptr[a] += 1
        # Only clusters that received proposals can change who they hold.
        touched = torch.zeros(capacity.numel(), dtype=torch.bool, device=device)
        touched[prop_c] = True
        held = rows[(assign >= 0) & touched[assign.clamp_min(0)]]
        pool_r = torch.cat([held, a])
        pool_c = torch.cat([assign[held], prop_c])
        pool_s = torch.cat([held_score[held], prop_s])
        # Order by (cluster asc, score desc, row asc) with two stable sorts, then rank per cluster.
        order = torch.argsort(pool_s, descending=True, stable=True)
        order = order[torch.argsort(pool_c[order], stable=True)]
        sc = pool_c[order]
        counts = torch.bincount(sc, minlength=capacity.numel())
        first = torch.cumsum(counts, 0) - counts
        rank = torch.arange(sc.numel(), device=device) - first[sc]
        keep = rank < capacity[sc]
        kept_r, kept_c, kept_s = pool_r[order][keep], sc[keep], pool_s[order][keep]
        assign[pool_r] = -1
        held_score[pool_r] = -math.inf
        assign[kept_r] = kept_c
        held_score[kept_r] = kept_s
    return assign


def balanced_assign(
    x: torch.Tensor, centroids: torch.Tensor, cluster_size: int, candidates: int
) -> torch.Tensor:
    """Assign every row of x to a centroid so that each gets exactly cluster_size rows."""
    n_clusters = centroids.shape[0]
    if n_clusters * cluster_size != x.shape[0]:
        raise ValueError(f"{x.shape[0]} rows do not split into {n_clusters} x {cluster_size}")
    ids, scores = _top_candidates(x, centroids, candidates)
    capacity = torch.full((n_clusters,), cluster_size, dtype=torch.int64, device=x.device)
    assign = assign_with_capacity(ids, scores, capacity)
    # Rows every candidate turned down go to the clusters that still have room, nearest first.
    # Each pass fills at least one cluster or places at least one row, so this terminates.
    while True:
        left = torch.nonzero(assign < 0).flatten()
        if left.numel() == 0:
            return assign
        free = capacity - torch.bincount(assign[assign >= 0], minlength=n_clusters)
        open_ids = torch.nonzero(free > 0).flatten()
        k = min(max(candidates, 32), open_ids.numel())
        sub_ids, sub_scores = _top_candidates(x[left], centroids[open_ids], k)
        sub = assign_with_capacity(sub_ids, sub_scores, free[open_ids])
        placed = sub >= 0
        assign[left[placed]] = open_ids[sub[placed]]


def _centroid_sums(x: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> torch.Tensor:
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, assign, x.float())
    return sums


def _kmeans_level(
    x: torch.Tensor,
    cluster_size: int,
    opts: KMeansOptions,
    generator: torch.Generator,
    bar: Progress | None,
    work_per_iter: float,
) -> torch.Tensor:
    """Flat balanced spherical k-means on unit rows x; returns [N] cluster ids."""
    n = x.shape[0]
    n_clusters = n // cluster_size
    if n_clusters == 1:
        if bar:
            bar.update(work_per_iter * opts.iterations)
        return torch.zeros(n, dtype=torch.int64, device=x.device)
    init = torch.randperm(n, generator=generator)[:n_clusters].to(x.device)
    centroids = x[init].float()
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(max(1, opts.iterations)):
        assign = balanced_assign(x, centroids, cluster_size, opts.candidates)
        centroids = _normalize(_centroid_sums(x, assign, n_clusters))
        if bar:
            bar.update(work_per_iter)
    return assign


def _group_count(n_clusters: int) -> int:
    """The divisor of n_clusters closest to sqrt(n_clusters): groups and clusters per group about
    equal, which minimizes the two levels' combined cost."""
    target = math.sqrt(n_clusters)
    divisors = [g for g in range(1, n_clusters + 1) if n_clusters % g == 0]
    return min(divisors, key=lambda g: (abs(math.log(g / target)), g))


def balanced_kmeans(x: torch.Tensor, opts: KMeansOptions) -> torch.Tensor:
    """Cluster the rows of x (any scale; clustered by direction) into groups of exactly
    opts.cluster_size. Returns [N] int64 cluster ids in 0 .. N / cluster_size - 1 (on the CPU)."""
    n, _ = x.shape
    s = opts.cluster_size
    if s < 1 or n % s:
        raise ValueError(
            f"the head has {n} rows, which is not a multiple of the cluster size {s}; "
            f"pick a cluster size that divides {n}"
        )
    device = pick_device(opts.device)
    generator = torch.Generator().manual_seed(opts.seed)
    xs = _normalize(x.to(device=device, dtype=torch.float32))
    n_clusters = n // s
    with Progress("clustering", total=1.0, enabled=opts.progress) as bar:
        if n_clusters <= opts.flat_max_clusters:
            return _kmeans_level(xs, s, opts, generator, bar, 1.0 / opts.iterations).cpu()
        groups = _group_count(n_clusters)
        per_group = n_clusters // groups
        # Level 1 is cheap (groups << clusters); level 2 does the bulk of the work.
        group_of = _kmeans_level(xs, n // groups, opts, generator, bar, 0.2 / opts.iterations)
        assign = torch.empty(n, dtype=torch.int64, device=device)
        for g in range(groups):
            members = torch.nonzero(group_of == g).flatten()
            local = _kmeans_level(
                xs[members], s, opts, generator, bar, 0.8 / (groups * opts.iterations)
            )
            assign[members] = local + g * per_group
        return assign.cpu()


def centroids_for(
    weight: torch.Tensor, assignments: torch.Tensor, mode: str = "mean"
) -> torch.Tensor:
    """[c, d] float32 centroids of the head rows per cluster.

    mean: the plain mean of the member rows (keeps the rows' norms, so h . centroid tracks the
    members' logits). normalized: the unit mean direction (upstream's cosine stage 1).
    """
    n_clusters = int(assignments.max()) + 1
    sums = _centroid_sums(weight.float(), assignments.to(weight.device), n_clusters)
    counts = torch.bincount(assignments.to(weight.device), minlength=n_clusters).clamp_min(1)
    if mode == "mean":
        return sums / counts[:, None]
    if mode == "normalized":
        return _normalize(sums)
    raise ValueError(f"unknown centroid mode {mode!r} (use mean or normalized)")
