"""Balanced k-means: every cluster gets exactly `cluster_size` rows.

Two metrics. `cosine` (spherical k-means) groups rows by direction; it needs nothing but the head.
`euclidean` is plain k-means on the rows as given; `flashhead convert` runs it on the head rows
times sqrt(E[h h^T]) from sampled hidden states, where the squared distance of a row to its
centroid is the expected squared logit error h . (w - c) over real text. That keeps the clusters
tight in the directions hidden states actually use.

FlashHead's kernels load one contiguous `cluster_size x d` tile per probed cluster, so the balance
is a hard requirement, not a preference. The assignment step is capacity-constrained: per-cluster
prices balance an argmax assignment (see `balanced_assign`), and the few rows left over go to the
nearest clusters with room, all vectorized in torch.

Large vocabularies (Gemma-3: 262144 rows, 16384 clusters) make a flat k-means step cost
V * c * d multiply-adds (~2.7 TFLOP, ~25 s per iteration on 2 cores), so above `flat_max_clusters`
the clustering is two-level: balanced groups first, then balanced clusters inside each group.
Everything is deterministic for a seed on a given device and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flashhead.calibration.progress import Progress

# Elements of one [rows, clusters] score block; bounds the scratch memory (bf16: 64 MiB).
_SCORE_BLOCK_ELEMS = 1 << 25


@dataclass(frozen=True)
class KMeansOptions:
    cluster_size: int = 16
    iterations: int = 8
    candidates: int = 16  # nearest centroids each row may propose to per assignment step
    seed: int = 0
    flat_max_clusters: int = 4096
    metric: str = "cosine"  # cosine | euclidean (see the module doc)
    device: str | None = None  # None: CUDA when available, else CPU (all cores)
    progress: bool = True


def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _score_dtype(device: torch.device) -> torch.dtype:
    # bf16 where it is fast (flashhead.compute_dtype); the scores only rank centroids for the
    # assignment, where bf16 rounding does not matter.
    from flashhead.compute_dtype import fast_dtype

    return fast_dtype(device)


METRICS = ("cosine", "euclidean")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


# Every assignment step ranks centroids by a dot product. For the euclidean metric, rows carry an
# extra 1 and centroids an extra -|c|^2 / 2, so that x . c - |c|^2 / 2 ranks like -|x - c|^2.
def _scoring_rows(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return _normalize(x)
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def _centroids_from_sums(sums: torch.Tensor, metric: str) -> torch.Tensor:
    """Centroids in scoring form from per-cluster sums of scoring rows (or from single rows)."""
    if metric == "cosine":
        return _normalize(sums)
    mean = sums[:, :-1] / sums[:, -1:].clamp_min(1.0)
    return torch.cat([mean, -(mean * mean).sum(dim=1, keepdim=True) / 2], dim=1)


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


def _keep_best(cluster: torch.Tensor, value: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows among the `capacity[c]` highest `value`s of their cluster."""
    order = torch.argsort(value, descending=True, stable=True)
    order = order[torch.argsort(cluster[order], stable=True)]
    sc = cluster[order]
    counts = torch.bincount(sc, minlength=capacity.numel())
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(sc.numel(), device=cluster.device) - first[sc]
    keep = torch.empty_like(cluster, dtype=torch.bool)
    keep[order] = rank < capacity[sc]
    return keep


def _price_balance(
    ids: torch.Tensor, scores: torch.Tensor, capacity: torch.Tensor, rounds: int
) -> torch.Tensor:
    """Per-cluster prices such that rows taking their best candidate by score - price come out
    nearly balanced (the Lagrangian form of the balanced assignment). Returns the chosen column."""
    n_clusters = capacity.numel()
    price = torch.zeros(n_clusters, dtype=torch.float32, device=ids.device)
    best = torch.zeros(ids.shape[0], dtype=torch.int64, device=ids.device)
    if ids.shape[1] < 2:
        return best
    margin = (scores[:, 0] - scores[:, 1]).median()
    step = float(margin.clamp_min(1e-4)) * 2.0
    cap = capacity.float()
    for _ in range(rounds):
        best = (scores - price[ids]).argmax(dim=1)
        counts = torch.bincount(ids.gather(1, best[:, None]).squeeze(1), minlength=n_clusters)
        load = (counts.float() - cap) / cap
        # Stop once under 1% of the rows sit in overfull clusters; fill_greedy places the rest.
        if float((counts.float() - cap).clamp_min(0).sum()) < 0.01 * ids.shape[0]:
            break
        price += step * load.clamp(-1.0, 1.0)
        step *= 0.9
    return best


def assign_from_candidates(
    ids: torch.Tensor,
    scores: torch.Tensor,
    capacity: torch.Tensor,
    price_rounds: int = 30,
    fill_anywhere: bool = False,
) -> torch.Tensor:
    """Capacity-constrained assignment of rows to their candidate clusters (best first).

    1. Prices balance an argmax assignment for all but a few percent of the rows.
    2. Overfull clusters keep their best rows by score - price; the evicted rows go to their
       nearest candidates with room left (`fill_greedy`).
    Returns [N] cluster per row; -1 where every candidate of a row filled up, unless
    `fill_anywhere`, which gives those rows the remaining free slots.
    """
    # Prices only need each row's few best candidates; the full lists serve the leftovers.
    best = _price_balance(ids[:, :16], scores[:, :16], capacity, price_rounds)
    cluster = ids.gather(1, best[:, None]).squeeze(1)
    value = scores.gather(1, best[:, None]).squeeze(1)
    assign = torch.where(_keep_best(cluster, value, capacity), cluster, -1)
    left = torch.nonzero(assign < 0).flatten()
    if left.numel():
        free = capacity - torch.bincount(assign[assign >= 0], minlength=capacity.numel())
        # Short lists first (cheap rounds); only rows they cannot place scan their full lists.
        placed = fill_greedy(ids[left, :16], scores[left, :16], free, max_rounds=12)
        assign[left] = placed
        rest = left[placed < 0]
        if rest.numel() and ids.shape[1] > 16:
            free = capacity - torch.bincount(assign[assign >= 0], minlength=capacity.numel())
            assign[rest] = fill_greedy(ids[rest], scores[rest], free, max_rounds=12)
        rest = torch.nonzero(assign < 0).flatten()
        if rest.numel() and fill_anywhere:
            # Long chains of bumps: the last few rows take the free slots in order (rare; the
            # next k-means iteration re-places them).
            free = capacity - torch.bincount(assign[assign >= 0], minlength=capacity.numel())
            slots = torch.repeat_interleave(torch.arange(capacity.numel(), device=ids.device), free)
            assign[rest] = slots[: rest.numel()]
    return assign


def fill_greedy(
    cand_ids: torch.Tensor,
    cand_scores: torch.Tensor,
    capacity: torch.Tensor,
    max_rounds: int | None = None,
) -> torch.Tensor:
    """Rows take their best candidate with room left; a cluster offered more rows than it has
    room for takes the best-scoring ones, the others try again with that cluster closed.

    Returns [N] cluster per row, -1 where all of a row's candidates filled up (or `max_rounds`
    ran out). Every round fills a cluster or places every row: at most `capacity.numel() + 1`.
    """
    n = cand_ids.shape[0]
    assign = torch.full((n,), -1, dtype=torch.int64, device=cand_ids.device)
    free = capacity.clone()
    pending = torch.arange(n, device=cand_ids.device)
    rounds = 0
    while pending.numel() and (max_rounds is None or rounds < max_rounds):
        rounds += 1
        ids, scores = cand_ids[pending], cand_scores[pending]
        scores = scores.masked_fill(free[ids] <= 0, -math.inf)
        best = scores.argmax(dim=1)
        value = scores.gather(1, best[:, None]).squeeze(1)
        alive = value > -math.inf
        pending, ids, best, value = pending[alive], ids[alive], best[alive], value[alive]
        if pending.numel() == 0:
            break
        cluster = ids.gather(1, best[:, None]).squeeze(1)
        keep = _keep_best(cluster, value, free)
        assign[pending[keep]] = cluster[keep]
        free -= torch.bincount(cluster[keep], minlength=free.numel())
        pending = pending[~keep]
    return assign


def _place_leftovers(
    x: torch.Tensor, centroids: torch.Tensor, assign: torch.Tensor, capacity: torch.Tensor, k: int
) -> None:
    """Rows whose candidates all filled up go to the nearest clusters that still have room.
    Each pass fills at least one cluster or places every row, so this terminates."""
    while True:
        left = torch.nonzero(assign < 0).flatten()
        if left.numel() == 0:
            return
        free = capacity - torch.bincount(assign[assign >= 0], minlength=capacity.numel())
        open_ids = torch.nonzero(free > 0).flatten()
        sub_ids, sub_scores = _top_candidates(
            x[left], centroids[open_ids], min(k, open_ids.numel())
        )
        sub = fill_greedy(sub_ids, sub_scores, free[open_ids])
        placed = sub >= 0
        assign[left[placed]] = open_ids[sub[placed]]


def balanced_assign(
    x: torch.Tensor, centroids: torch.Tensor, cluster_size: int, candidates: int
) -> torch.Tensor:
    """Assign every row of x to a centroid so that each gets exactly cluster_size rows."""
    n_clusters = centroids.shape[0]
    if n_clusters * cluster_size != x.shape[0]:
        raise ValueError(f"{x.shape[0]} rows do not split into {n_clusters} x {cluster_size}")
    ids, scores = _top_candidates(x, centroids, candidates)
    capacity = torch.full((n_clusters,), cluster_size, dtype=torch.int64, device=x.device)
    assign = assign_from_candidates(ids, scores, capacity)
    _place_leftovers(x, centroids, assign, capacity, max(candidates, 32))
    return assign


def _centroid_sums(x: torch.Tensor, assign: torch.Tensor, n_clusters: int) -> torch.Tensor:
    sums = torch.zeros(n_clusters, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, assign, x.float())
    return sums


def _random_rows(n: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randperm(n, generator=generator)[:k].to(device)


def _kmeans_flat(
    x: torch.Tensor, cluster_size: int, opts: KMeansOptions, generator: torch.Generator, bar
) -> torch.Tensor:
    """Balanced k-means on scoring rows x (`_scoring_rows`); returns [N] cluster ids."""
    n = x.shape[0]
    n_clusters = n // cluster_size
    centroids = _centroids_from_sums(
        x[_random_rows(n, n_clusters, generator, x.device)].float(), opts.metric
    )
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(opts.iterations):
        assign = balanced_assign(x, centroids, cluster_size, opts.candidates)
        centroids = _centroids_from_sums(_centroid_sums(x, assign, n_clusters), opts.metric)
        bar()
    return assign


def _kmeans_within_groups(
    x: torch.Tensor,
    group_of: torch.Tensor,
    groups: int,
    cluster_size: int,
    opts: KMeansOptions,
    generator: torch.Generator,
    bar,
) -> torch.Tensor:
    """Balanced k-means run in every (equal-size) group at once: rows only see their own group's
    centroids, so one batched GEMM scores all groups and one assignment balances them all."""
    n, d = x.shape
    per_group = n // groups // cluster_size  # clusters per group
    order = torch.argsort(group_of, stable=True)
    xg = x[order].view(groups, n // groups, d)
    first = torch.stack(
        [_random_rows(n // groups, per_group, generator, x.device) for _ in range(groups)]
    )
    centroids = torch.gather(xg, 1, first[:, :, None].expand(-1, -1, d)).float()
    centroids = _centroids_from_sums(centroids.view(-1, d), opts.metric).view(groups, per_group, d)
    offset = (torch.arange(groups, device=x.device) * per_group)[:, None, None]
    capacity = torch.full((groups * per_group,), cluster_size, dtype=torch.int64, device=x.device)
    k = per_group  # every cluster of the group: the leftovers always find room
    dtype = _score_dtype(x.device)
    assign = torch.zeros(n, dtype=torch.int64, device=x.device)
    for _ in range(opts.iterations):
        scores = torch.bmm(xg.to(dtype), centroids.to(dtype).transpose(1, 2)).float()
        top = scores.topk(k, dim=2)
        ids = (top.indices + offset).view(n, k)
        assign = assign_from_candidates(ids, top.values.view(n, k), capacity, fill_anywhere=True)
        sums = _centroid_sums(x[order], assign, groups * per_group)
        centroids = _centroids_from_sums(sums, opts.metric).view(groups, per_group, d)
        bar()
    out = torch.empty_like(assign)
    out[order] = assign
    return out


def _group_count(n_clusters: int) -> int:
    """The divisor of n_clusters closest to sqrt(n_clusters): groups and clusters per group about
    equal, which minimizes the two levels' combined cost."""
    target = math.sqrt(n_clusters)
    divisors = [g for g in range(1, n_clusters + 1) if n_clusters % g == 0]
    return min(divisors, key=lambda g: (abs(math.log(g / target)), g))


def balanced_kmeans(x: torch.Tensor, opts: KMeansOptions) -> torch.Tensor:
    """Cluster the rows of x into groups of exactly opts.cluster_size, by direction
    (opts.metric cosine) or by distance (euclidean). Returns [N] int64 cluster ids in
    0 .. N / cluster_size - 1 (on the CPU)."""
    n, _ = x.shape
    s = opts.cluster_size
    if s < 1 or n % s:
        raise ValueError(
            f"the head has {n} rows, which is not a multiple of the cluster size {s}; "
            f"pick a cluster size that divides {n}"
        )
    if opts.metric not in METRICS:
        raise ValueError(f"unknown metric {opts.metric!r} (use {' or '.join(METRICS)})")
    if opts.iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {opts.iterations}")
    device = pick_device(opts.device)
    generator = torch.Generator().manual_seed(opts.seed)
    xs = _scoring_rows(x.to(device=device, dtype=torch.float32), opts.metric)
    n_clusters = n // s
    flat = n_clusters <= opts.flat_max_clusters
    steps = opts.iterations * (1 if flat else 2)
    with Progress("clustering", total=steps, enabled=opts.progress) as bar:
        tick = lambda: bar.update(1)  # noqa: E731
        if n_clusters == 1:
            return torch.zeros(n, dtype=torch.int64)
        if flat:
            return _kmeans_flat(xs, s, opts, generator, tick).cpu()
        groups = _group_count(n_clusters)
        group_of = _kmeans_flat(xs, n // groups, opts, generator, tick)
        return _kmeans_within_groups(xs, group_of, groups, s, opts, generator, tick).cpu()


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
