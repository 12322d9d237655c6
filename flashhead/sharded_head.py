"""FlashHead over a vocab-parallel head: each tensor-parallel rank holds a contiguous shard of
the head's rows, as vLLM's ``ParallelLMHead`` does.

- **Stage 1 is replicated.** Every rank keeps all int8 centroids (small: c x d bytes), scores
  them on the same hidden states, and selects the same top-p clusters.
- **Clusters are owned by ranks** (cluster k by rank ``k % world``; the special-token blocks by
  rank 0), so each rank's cluster-major copy holds about V / world rows: its share of the head,
  never the whole head. The rows a rank owns but does not hold are exchanged once, at build time,
  in bounded rounds of an all-gather.
- **One small collective per step.** Each rank scores the probed clusters it owns and writes 0 in
  the other slots; a SUM all-reduce of the ``[N, K]`` candidate scores (K = probed slots, a few
  percent of V) gives every rank the same scores, where the dense path all-gathers ``[N, V]``
  logits. Padding slots are ``-inf`` on every rank and stay ``-inf``.
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

EXCHANGE_ROWS = 2048  # rows each rank sends per exchange round (bounds the transient buffer)
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


def cluster_owner(n_clusters: int, n_special_clusters: int, world_size: int) -> torch.Tensor:
    """[c_ext] int64 rank that scores each block: cluster k -> k % world, specials -> 0."""
    owner = torch.arange(n_clusters + n_special_clusters) % world_size
    owner[n_clusters:] = 0
    return owner


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


class ShardedFlashHead:
    """One rank's FlashHead over its shard of a vocab-parallel head. Build it on every rank at
    the same time (`build` runs collectives)."""

    def __init__(
        self,
        meta: ClusterIndex,
        local: ClusterIndex,
        local_of: torch.Tensor,
        assets: FlashHeadAssets,
        comm: Collectives,
        shard_bytes: int,
        backend: str | None = None,
        options: KernelOptions | None = None,
    ):
        self.meta = meta  # global slot ids, specials and centroids (stage 1, candidate ids)
        self.local = local  # this rank's owned blocks + one zero block (stage 2)
        self.local_of = local_of  # [c_ext] global block -> local block (zero block if not owned)
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
        exchange_rows: int = EXCHANGE_ROWS,
    ) -> ShardedFlashHead:
        """`shard` holds tokens [vocab_start, vocab_end) in its first rows (padding after)."""
        shard = shard.detach()
        check_shard(shard, vocab_start, vocab_end, assets.hidden_size)
        if assets.stage1 == "head_int4":
            from flashhead.sharded_int4 import ShardedInt4Head

            return ShardedInt4Head.build_int4(
                shard, vocab_start, vocab_end, assets, comm, backend=backend, options=options
            )
        d = assets.hidden_size
        device = shard.device
        layout = slot_layout(assets, device)
        c, s, n_spc = layout.n_clusters, layout.cluster_size, layout.n_special_clusters
        owner = cluster_owner(c, n_spc, comm.world_size).to(device)
        owned = (owner == comm.rank).nonzero().flatten()
        zero_block = len(owned)
        local_of = torch.full((c + n_spc,), zero_block, dtype=torch.int64, device=device)
        local_of[owned] = torch.arange(len(owned), device=device)

        wc = torch.zeros((len(owned) + 1) * s, d, dtype=shard.dtype, device=device)
        token = layout.slot_ids.to(torch.int64)  # [c_ext * s] per global slot
        slot_owner = owner.repeat_interleave(s)
        local_slot = local_of.repeat_interleave(s) * s + torch.arange(s, device=device).repeat(
            c + n_spc
        )

        holder = token_holders(token, vocab_start, vocab_end, comm)

        mine = (slot_owner == comm.rank) & (holder == comm.rank)
        wc[local_slot[mine]] = shard[token[mine] - vocab_start]
        cls._exchange(
            wc, shard, token, holder, slot_owner, local_slot, vocab_start, comm, exchange_rows
        )

        cent_q, scale = quantize_centroids(assets.centroids.to(device=device))
        meta = ClusterIndex(
            wc=wc[:0],
            slot_ids=layout.slot_ids,
            slot_home=layout.slot_home,
            cent_q=cent_q.contiguous(),
            cent_scale=scale.contiguous(),
            n_clusters=c,
            cluster_size=s,
            n_special_clusters=n_spc,
        )
        # Stage 2 reads the local blocks only; its slot ids are placeholders (never -1, so the
        # kernel masks nothing): the global ids decide padding.
        local = ClusterIndex(
            wc=wc,
            slot_ids=torch.zeros(wc.shape[0], dtype=torch.int32, device=device),
            slot_home=torch.full((wc.shape[0],), -1, dtype=torch.int32, device=device),
            cent_q=cent_q[:0],
            cent_scale=scale[:0],
            n_clusters=len(owned) + 1,
            cluster_size=s,
            n_special_clusters=0,
        )
        shard_bytes = shard.numel() * shard.element_size()
        return cls(meta, local, local_of, assets, comm, shard_bytes, backend, options)

    @staticmethod
    def _exchange(wc, shard, token, holder, slot_owner, local_slot, start, comm, rows) -> None:
        """Copy in the rows this rank owns but another rank holds: every rank sends, in rounds
        of `rows`, the rows it holds for others (the same lists on every rank, so every rank
        knows which received row goes where)."""
        sends = [
            ((holder == q) & (slot_owner != q)).nonzero().flatten() for q in range(comm.world_size)
        ]
        rounds = -(-max(len(x) for x in sends) // rows) if sends else 0
        d = wc.shape[1]
        for r in range(rounds):
            mine = sends[comm.rank][r * rows : (r + 1) * rows]
            out = torch.zeros(rows, d, dtype=wc.dtype, device=wc.device)
            out[: len(mine)] = shard[token[mine] - start]
            got = comm.all_gather(out).view(comm.world_size, rows, d)
            for q in range(comm.world_size):
                batch = sends[q][r * rows : (r + 1) * rows]
                keep = slot_owner[batch] == comm.rank
                if q != comm.rank and bool(keep.any()):
                    wc[local_slot[batch[keep]]] = got[q, : len(batch)][keep]

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
        return int(self.local.wc.shape[0]) - self.cluster_size  # less the zero block

    @property
    def extra_bytes(self) -> int:
        """This rank's FlashHead bytes: its owned rows, slot ids and the replicated centroids."""
        tensors = (
            self.local.wc,
            self.meta.slot_ids,
            self.meta.slot_home,
            self.meta.cent_q,
            self.meta.cent_scale,
            self.local_of,
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def uses_dense(self, n_rows: int, device: torch.device | None = None) -> bool:
        """True when the dispatcher would rather run the stock sharded head for this batch (the
        per-rank rule: this rank's share of the candidates against its share of the head)."""
        return dispatch.prefer_dense(
            self.backend,
            device or self.local.wc.device,
            n_rows,
            self.meta.n_clusters // self.world_size + self.candidate_rows // self.world_size,
            self.vocab_size // self.world_size,
            self.options.dense_min_batch,
            self.meta.n_clusters,
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
        scores = self._owned_scores(h, probes)
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

    def _owned_scores(self, h: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
        """[B, K] scores of the candidate slots this rank owns, 0 in the others (the zero block)."""
        _, scores, _ = self._ops.candidate_scores(
            h,
            self.local,
            self.local_of[probes],
            None,
            None,
            want_tokens=False,
            want_scores=True,
            buffers=self._buffers,
        )
        return scores

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


__all__ = ["Collectives", "ShardMismatch", "ShardedFlashHead", "cluster_owner"]
