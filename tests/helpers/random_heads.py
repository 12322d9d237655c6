"""Random clustered heads with FlashHead assets, for kernel and sharded-head tests (a module of
its own so that worker processes can import it without a conftest)."""

from __future__ import annotations

import torch


def random_assets(
    vocab: int,
    hidden: int,
    n_clusters: int,
    *,
    n_probes: int,
    specials: list[int] | None = None,
    unequal: bool = False,
    seed: int = 0,
):
    """(weight [V, d] float32, FlashHeadAssets) with clustered structure: tokens are noisy copies
    of their cluster's centroid, so the centroid ranking predicts the token ranking."""
    from pathlib import Path

    from flashhead.assets import FlashHeadAssets

    gen = torch.Generator().manual_seed(seed)
    assign = torch.randperm(vocab, generator=gen) % n_clusters
    if unequal:
        assign[assign == 0] = torch.where(torch.arange(int((assign == 0).sum())) % 2 == 0, 0, 1)
    centers = torch.randn(n_clusters, hidden, generator=gen)
    weight = centers[assign] + 0.5 * torch.randn(vocab, hidden, generator=gen)
    centroids = torch.stack([weight[assign == i].mean(0) for i in range(n_clusters)])
    assets = FlashHeadAssets(
        model_dir=Path("."), cache_dir=Path("."), centroids=centroids, assignments=assign,
        n_probes=n_probes, special_token_ids=sorted(specials or []),
    )  # fmt: skip
    return weight, assets


def random_int4_assets(
    vocab: int, hidden: int, *, n_probes: int, specials: list[int] | None = None, seed: int = 0
):
    """(weight [V, d] float32, FlashHeadAssets) with stage 1 on the head's int4 rows: clusters of
    one token, in a random order (the assignments are a permutation of the vocabulary)."""
    from pathlib import Path

    from flashhead.assets import FlashHeadAssets

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=gen)
    assets = FlashHeadAssets(
        model_dir=Path("."), cache_dir=Path("."), centroids=torch.zeros(vocab, 0),
        assignments=torch.randperm(vocab, generator=gen), n_probes=n_probes,
        special_token_ids=sorted(specials or []), stage1="head_int4", hidden=hidden,
    )  # fmt: skip
    return weight, assets
