"""FlashHead over a vocab-parallel head: each tensor-parallel rank holds a contiguous shard of
the head's rows, as vLLM's ``ParallelLMHead`` does.

- **Stage 1 is replicated.** Every rank keeps all int8 centroids (small: c x d bytes), scores
  them on the same hidden states, and selects the same top-p clusters.
- **Stage 2 reads vLLM's shard in place.** Each rank scores the candidate tokens its own shard
  holds, gathered row by row from the shard: no cluster-major copy, and no row moves between
  ranks. FlashHead's memory on a rank is the replicated centroids and slot ids (0.25x of a bf16
  shard at TP=2 with clusters of 4, the densest layout convert writes).
- **One small collective per step.** Each rank scores the candidate slots whose tokens it holds
  and writes 0 in the other slots; a SUM all-reduce of the ``[N, K]`` candidate scores (K =
  probed slots, a few percent of V) gives every rank the same scores, where the dense path
  all-gathers ``[N, V]`` logits. Padding slots are ``-inf`` on every rank and stay ``-inf``.
- **Probes are checked, not assumed, equal.** Two hash columns ride in the same all-reduce: all
  ranks probed the same clusters for a row exactly when ``sum(h)^2 == world * sum(h^2)``
  (Cauchy-Schwarz), a test every rank evaluates on the same reduced numbers, so they all reach
  the same verdict. A mismatch raises ``ShardMismatch`` on every rank together.

Models whose stage 1 scores the head's own int4 rows split stage 1 along the vocabulary
instead (`flashhead.sharded_int4`); `ShardedFlashHead.build` picks the layout.

Knows nothing of vLLM: the caller passes the collectives (`Collectives`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flashhead.assets import FlashHeadAssets
from flashhead.head import (
    check_hidden_states,
    quantize_centroids,
    select_clusters,
    slot_layout,
)
from flashhead.kernels import dispatch
from flashhead.kernels.index import ClusterIndex, candidate_ids
from flashhead.kernels.options import KernelOptions
from flashhead.sampling_noise import inverse_temperature
from flashhead.settings import settings

_HASH_MOD = 509  # world * 508^2 < 2^24 for world <= 64: the hash sums stay exact in float32
_N_HASHES = 3


class ShardMismatch(RuntimeError):
    """The ranks did not probe the same clusters (their hidden states or noise differ)."""


@dataclass(frozen=True)
class Collectives:
    """What the sharded head needs of the tensor-parallel group (every rank calls each one, in
    the same order)."""

    rank: int
    world_size: int
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    # Concatenates every rank's tensor along dim 0, in rank order.
    all_gather: Callable[[torch.Tensor], torch.Tensor]


def check_shard(shard: torch.Tensor, vocab_start: int, vocab_end: int, hidden: int) -> None:
    if shard.dim() != 2 or shard.shape[1] != hidden or shard.shape[0] < vocab_end - vocab_start:
        raise ValueError(
            f"ShardedFlashHead.build: shard {list(shard.shape)} does not hold tokens "
            f"[{vocab_start}, {vocab_end}) of a d={hidden} head"
        )


def token_holders(
    token: torch.Tensor, vocab_start: int, vocab_end: int, comm: Collectives
) -> torch.Tensor:
    """Which rank's shard holds each token id of `token` (-1 stays -1). A collective."""
    # float32 (exact below 2^24 tokens): vLLM's shared-memory all-gather takes no int64.
    mine = torch.tensor([[vocab_start, vocab_end]], dtype=torch.float32, device=token.device)
    ranges = comm.all_gather(mine).to(torch.int64)
    holder = torch.full_like(token, -1)
    for q in range(comm.world_size):
        inside = (token >= ranges[q, 0]) & (token < ranges[q, 1])
        holder[inside] = q
    if bool(((token >= 0) & (holder < 0)).any()):
        raise ValueError("ShardedFlashHead.build: the ranks' shards do not cover the vocabulary")
    return holder


def shard_index(shard: torch.Tensor, vocab_start: int, vocab_end: int) -> ClusterIndex:
    """Stage 2's view of a rank's shard: its tokens' rows in shard order, as clusters of one row
    (a view of vLLM's own tensor, no copy). Its slot ids are placeholders (never -1, so the
    kernel masks nothing): the global candidate ids decide padding."""
    n_local = vocab_end - vocab_start
    device = shard.device
    return ClusterIndex(
        wc=shard[:n_local],
        slot_ids=torch.zeros(n_local, dtype=torch.int32, device=device),
        slot_home=torch.full((n_local,), -1, dtype=torch.int32, device=device),
        cent_q=torch.zeros(0, shard.shape[1], dtype=torch.int8, device=device),
        cent_scale=torch.zeros(0, dtype=torch.float32, device=device),
        n_clusters=n_local,
        cluster_size=1,
        n_special_clusters=0,
    )


class ShardedFlashHead:
    """One rank's FlashHead over its shard of a vocab-parallel head. Build it on every rank at
    the same time (`build` runs collectives)."""

    def __init__(
        self,
        meta: ClusterIndex,
        local: ClusterIndex,
        vocab_start: int,
        assets: FlashHeadAssets,
        comm: Collectives,
        shard_bytes: int,
        backend: str | None = None,
        options: KernelOptions | None = None,
    ):
        self.meta = meta  # global slot ids, specials and centroids (stage 1, candidate ids)
        self.local = local  # this rank's shard rows (`shard_index`): stage 2
        self.vocab_start = vocab_start
        self.comm = comm
        self.vocab_size = assets.vocab_size
        self.n_clusters = meta.n_clusters
        self.cluster_size = meta.cluster_size
        self.n_probes = assets.n_probes
        self.world_size = comm.world_size
        self.shard_bytes = shard_bytes
        self.logits_element_size = local.wc.element_size()  # vLLM gathers logits in this dtype
        self.options = options if options is not None else settings().kernel_options()
        device = local.wc.device
        self.backend = dispatch.resolve_backend(backend, device, self.options)
        self._ops = dispatch.backend_ops(self.backend, self.options)
        # Set by a server that timed vLLM's sharded dense head against this one, with every rank
        # agreeing on the timings (flashhead/crossover.py).
        self.measured_min_batch: int | None = None
        self._buffers: dict = {}
        self._hash_weights = None

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        shard: torch.Tensor,
        vocab_start: int,
        vocab_end: int,
        assets: FlashHeadAssets,
        comm: Collectives,
        *,
        backend: str | None = None,
        options: KernelOptions | None = None,
    ) -> ShardedFlashHead:
        """`shard` holds tokens [vocab_start, vocab_end) in its first rows (padding after)."""
        shard = shard.detach()
        check_shard(shard, vocab_start, vocab_end, assets.hidden_size)
        if assets.stage1 == "head_int4":
            from flashhead.sharded_int4 import ShardedInt4Head

            return ShardedInt4Head.build_int4(
                shard, vocab_start, vocab_end, assets, comm, backend=backend, options=options
            )
        device = shard.device
        layout = slot_layout(assets, device)
        # Every slot's token lies in some rank's shard (a collective: all ranks check together).
        token_holders(layout.slot_ids.to(torch.int64), vocab_start, vocab_end, comm)
        cent_q, scale = quantize_centroids(assets.centroids.to(device=device))
        meta = ClusterIndex(
            wc=shard[:0],
            slot_ids=layout.slot_ids,
            slot_home=layout.slot_home,
            cent_q=cent_q.contiguous(),
            cent_scale=scale.contiguous(),
            n_clusters=layout.n_clusters,
            cluster_size=layout.cluster_size,
            n_special_clusters=layout.n_special_clusters,
        )
        local = shard_index(shard, vocab_start, vocab_end)
        shard_bytes = shard.numel() * shard.element_size()
        return cls(meta, local, vocab_start, assets, comm, shard_bytes, backend, options)

    # -- what the handler reads --------------------------------------------------------------
    @property
    def candidate_rows(self) -> int:
        return (self.n_probes + self.meta.n_special_clusters) * self.cluster_size

    @property
    def sent_bytes_per_row(self) -> int:
        """Bytes this rank contributes to the step's collectives per logits row: the all-reduce
        of the candidate scores and the probe hashes (float32)."""
        return 4 * (self.candidate_rows + 2 * _N_HASHES)

    @property
    def dense_sent_bytes_per_row(self) -> int:
        """What this rank contributes per row to vLLM's gather of the logits: its shard's share
        of the vocabulary, in the head's dtype."""
        return -(-self.vocab_size // self.world_size) * self.logits_element_size

    @property
    def owned_rows(self) -> int:
        """The rows this rank scores: its own shard's tokens."""
        return int(self.local.wc.shape[0])

    @property
    def extra_bytes(self) -> int:
        """This rank's FlashHead bytes: the replicated centroids and slot ids, and stage 2's
        placeholder ids. The candidate rows themselves are vLLM's shard: no copy."""
        tensors = (
            self.meta.slot_ids,
            self.meta.slot_home,
            self.meta.cent_q,
            self.meta.cent_scale,
            self.local.slot_ids,
            self.local.slot_home,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def uses_dense(self, n_rows: int, device: torch.device | None = None) -> bool:
        """True when the dispatcher would rather run the stock sharded head for this batch (the
        per-rank rule: what this rank scores, all centroids and every candidate slot, the ones
        it does not hold at a masked row each, against its share of the head)."""
        return dispatch.prefer_dense(
            self.backend,
            device or self.local.wc.device,
            n_rows,
            self.meta.n_clusters + self.candidate_rows,
            self.vocab_size // self.world_size,
            self.options.dense_min_batch,
            self.meta.n_clusters,
            self.measured_min_batch,
        )

    # -- one step ----------------------------------------------------------------------------
    def logits(
        self,
        h: torch.Tensor,
        *,
        temperature: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """[B, V] float32 (or `dtype`) on every rank: candidate scores (after `transform`),
        -inf elsewhere. A collective: every rank calls it with the same rows."""
        h = check_hidden_states(h, self.local.hidden_size)
        n_rows = h.shape[0]
        inv_t = inverse_temperature(temperature, n_rows, h.device)
        probes = self._select(h, inv_t, temperature, generators)
        ids = candidate_ids(self.meta, probes)
        scores = self._held_scores(h, ids)
        k = ids.shape[1]
        buf = torch.empty(n_rows, k + 2 * _N_HASHES, dtype=torch.float32, device=h.device)
        buf[:, :k] = scores.float().masked_fill(ids < 0, float("-inf"))
        hashes = self._probe_hashes(probes)
        buf[:, k : k + _N_HASHES] = hashes
        buf[:, k + _N_HASHES :] = hashes * hashes
        buf = self.comm.all_reduce_sum(buf)
        total, squares = buf[:, k : k + _N_HASHES], buf[:, k + _N_HASHES :]
        if not bool((total * total == self.world_size * squares).all()):
            raise ShardMismatch(
                "the tensor-parallel ranks selected different clusters for the same rows"
            )
        scores = buf[:, :k]
        if transform is not None:
            scores = transform(scores).float().masked_fill(ids < 0, float("-inf"))
        out = torch.full((n_rows, self.vocab_size), float("-inf"), device=h.device)
        out.scatter_reduce_(1, ids.clamp_min(0), scores, reduce="amax")
        return out if dtype is None else out.to(dtype)

    def _select(self, h, inv_t, temperature, generators) -> torch.Tensor:
        """[B, P] global probes, the same on every rank: stage 1 on the replicated centroids."""
        return select_clusters(
            self._ops, self.meta, h, self.n_probes, inv_t, temperature, generators, self._buffers
        )

    def _held_scores(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, K] scores of the candidate tokens `ids` this rank's shard holds, read in place;
        0 in the other slots (and padding)."""
        local = ids - self.vocab_start
        held = (local >= 0) & (local < self.owned_rows)
        _, scores, _ = self._ops.candidate_scores(
            h,
            self.local,
            local.masked_fill(~held, 0),
            None,
            None,
            want_tokens=False,
            want_scores=True,
            buffers=self._buffers,
        )
        return scores.masked_fill(~held, 0.0)

    def _probe_hashes(self, probes: torch.Tensor) -> torch.Tensor:
        """[B, _N_HASHES] float32 in [0, _HASH_MOD): position-weighted sums of the probes."""
        width = probes.shape[1]
        if self._hash_weights is None or self._hash_weights.shape[0] != width:
            pos = torch.arange(width, device=probes.device)
            self._hash_weights = torch.stack(
                [(pos * a + b) % _HASH_MOD + 1 for a, b in ((7, 3), (31, 11), (101, 5))], dim=1
            )
        weighted = ((probes + 1) % _HASH_MOD).unsqueeze(2) * self._hash_weights.unsqueeze(0)
        return (weighted.sum(dim=1) % _HASH_MOD).float()

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "vocab_size": self.vocab_size,
            "n_clusters": self.n_clusters,
            "cluster_size": self.cluster_size,
            "n_probes": self.n_probes,
            "tensor_parallel": self.world_size,
            "rank": self.comm.rank,
            "owned_rows": self.owned_rows,
            "extra_bytes": self.extra_bytes,
            "shard_bytes": self.shard_bytes,
            "sent_bytes_per_row": self.sent_bytes_per_row,
            "dense_sent_bytes_per_row": self.dense_sent_bytes_per_row,
        }


__all__ = ["Collectives", "ShardMismatch", "ShardedFlashHead", "shard_index"]
