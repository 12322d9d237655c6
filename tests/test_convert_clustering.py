"""Balanced k-means and fitted centroids on synthetic data: balance, determinism, quality."""

from __future__ import annotations

import pytest
import torch

from flashhead.convert.clustering import (
    KMeansOptions,
    balanced_kmeans,
    centroids_for,
    fill_greedy,
)
from flashhead.convert.fit import cluster_max_logits, fit_centroids


def _mixture(n_centers: int, per_center: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_centers, d, generator=g)
    x = centers.repeat_interleave(per_center, 0) + 0.05 * torch.randn(
        n_centers * per_center, d, generator=g
    )
    return x[torch.randperm(x.shape[0], generator=g)]


@pytest.mark.parametrize("flat_max", [4096, 8])  # flat, and two-level (groups of clusters)
def test_every_cluster_gets_exactly_cluster_size_rows(flat_max):
    x = torch.randn(2048, 32, generator=torch.Generator().manual_seed(1))
    opts = KMeansOptions(cluster_size=16, iterations=3, flat_max_clusters=flat_max, progress=False)
    a = balanced_kmeans(x, opts)
    assert a.shape == (2048,) and a.dtype == torch.int64
    assert torch.bincount(a, minlength=128).tolist() == [16] * 128


def test_same_seed_same_clusters_other_seed_other_clusters():
    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(2))
    opts = KMeansOptions(cluster_size=16, iterations=3, progress=False)
    a = balanced_kmeans(x, opts)
    assert torch.equal(a, balanced_kmeans(x, opts))
    b = balanced_kmeans(x, KMeansOptions(cluster_size=16, iterations=3, seed=1, progress=False))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("flat_max", [4096, 4])
def test_recovers_planted_equal_size_clusters(flat_max):
    # 64 tight blobs of 16 points: the right clustering puts each blob in one cluster.
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(64, 24, generator=g)
    labels = torch.arange(64).repeat_interleave(16)
    x = centers[labels] + 0.02 * torch.randn(1024, 24, generator=g)
    perm = torch.randperm(1024, generator=g)
    x, labels = x[perm], labels[perm]
    opts = KMeansOptions(cluster_size=16, iterations=8, flat_max_clusters=flat_max, progress=False)
    a = balanced_kmeans(x, opts)
    # Purity: share of rows whose cluster's majority blob is their own blob.
    pure = 0
    for c in range(64):
        members = labels[a == c]
        pure += int(torch.bincount(members).max())
    assert pure / 1024 > 0.9


def test_rejects_a_vocabulary_that_does_not_split_evenly():
    with pytest.raises(ValueError, match="multiple of the cluster size 16"):
        balanced_kmeans(torch.randn(100, 8), KMeansOptions(cluster_size=16, progress=False))


def test_fill_greedy_respects_capacity_and_prefers_best_scores():
    ids = torch.tensor([[0, 1], [0, 1], [0, 1]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.5, 0.4]])
    a = fill_greedy(ids, scores, torch.tensor([1, 2]))
    assert a.tolist() == [0, 1, 1]
    # No room anywhere for the third row: -1, never an overfull cluster.
    a = fill_greedy(ids, scores, torch.tensor([1, 1]))
    assert a.tolist() == [0, 1, -1]


def test_centroid_modes():
    w = torch.tensor([[2.0, 0.0], [0.0, 2.0], [4.0, 4.0], [0.0, -4.0]])
    a = torch.tensor([0, 0, 1, 1])
    mean = centroids_for(w, a, "mean")
    assert torch.allclose(mean, torch.tensor([[1.0, 1.0], [2.0, 0.0]]))
    norm = centroids_for(w, a, "normalized")
    assert torch.allclose(norm.norm(dim=1), torch.ones(2))
    with pytest.raises(ValueError, match="unknown centroid mode"):
        centroids_for(w, a, "median")


def test_cluster_max_logits_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 8, generator=g)
    a = torch.randperm(64, generator=g) % 8
    h = torch.randn(5, 8, generator=g)
    got = cluster_max_logits(h, w, a)
    logits = h @ w.T
    want = torch.stack([logits[:, a == c].max(dim=1).values for c in range(8)], dim=1)
    assert torch.allclose(got, want, rtol=2e-2, atol=5e-2)  # bf16 GEMM


def test_fitted_centroids_rank_the_winning_cluster_better_than_means():
    # Rows with very different norms: the mean centroid misjudges clusters, the fit does not.
    g = torch.Generator().manual_seed(5)
    d, v = 32, 2048
    w = torch.randn(v, d, generator=g) * torch.rand(v, 1, generator=g).pow(3) * 4
    a = balanced_kmeans(w, KMeansOptions(cluster_size=16, iterations=4, progress=False))
    h = torch.randn(6000, d, generator=g)
    h_fit, h_test = h[:4000], h[4000:]
    fitted = fit_centroids(h_fit, w, a)
    mean = centroids_for(w, a, "mean")
    winner = a[(h_test @ w.T).argmax(dim=1)]

    def top8_hit(c: torch.Tensor) -> float:
        top = (h_test @ c.T).topk(8, dim=1).indices
        return float((top == winner[:, None]).any(dim=1).float().mean())

    print(f"top-8 hit: fitted {top8_hit(fitted):.3f}, mean {top8_hit(mean):.3f}")
    assert top8_hit(fitted) > top8_hit(mean) + 0.1
