"""FlashHead over a vocab-parallel head when stage 1 scores the head's own int4 rows
(``flash_head_stage1: head_int4``, clusters of one token).

Here stage 1 itself splits along the vocabulary, so nothing is replicated and no row moves:

- **Each rank owns the tokens of its own shard.** It quantizes those rows to int4 (the same
  per-row quantization as the single-rank head) and scores them; stage 2 reads the candidate
  rows straight from vLLM's shard, with no cluster-major copy.
- **One small all-gather picks the probes.** Each rank sends its local top-p (key, cluster id)
  pairs, ``[B, 2p]`` floats; every rank then selects the global top-p from the same gathered
  numbers, with the single-rank select, so the ranks cannot disagree. The global top-p lies
  inside the union of the local top-p sets, so this is the single-rank selection.
- **Then the same SUM all-reduce of the ``[N, K]`` candidate scores** as `ShardedFlashHead`:
  each rank fills the slots of the tokens it holds and 0 elsewhere.

Sampled rows draw the full ``[B, V]`` Gumbel noise from each request's generator, as the single-
rank head does (so a seeded request advances its generator alike), and each rank uses its own
tokens' columns. Knows nothing of vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flashhead.assets import FlashHeadAssets
from flashhead.head import prepare_int4_stage1, slot_layout
from flashhead.kernels import dispatch, reference
from flashhead.kernels.index import ClusterIndex
from flashhead.kernels.int4_rows import Int4Rows, quantize_int4_rows
from flashhead.kernels.options import KernelOptions
from flashhead.sampling_noise import draw_gumbel
from flashhead.sharded_head import Collectives, ShardedFlashHead, shard_index, token_holders


class ShardedInt4Head(ShardedFlashHead):
    """One rank's FlashHead with int4-row stage 1 over its shard. Build it on every rank at the
    same time (`ShardedFlashHead.build` runs collectives and picks this class)."""

    def __init__(
        self,
        meta: ClusterIndex,
        local: ClusterIndex,
        vocab_start: int,
        assets: FlashHeadAssets,
        comm: Collectives,
        shard_bytes: int,
        rows4: Int4Rows,
        local_clusters: torch.Tensor,
        backend: str | None = None,
        options: KernelOptions | None = None,
    ):
        super().__init__(meta, local, vocab_start, assets, comm, shard_bytes, backend, options)
        self.rows4 = rows4  # this rank's tokens at int4, in shard order
        self.local_clusters = local_clusters  # [n_local] global cluster of each local row

    @classmethod
    def build_int4(
        cls,
        shard: torch.Tensor,
        vocab_start: int,
        vocab_end: int,
        assets: FlashHeadAssets,
        comm: Collectives,
        *,
        backend: str | None = None,
        options: KernelOptions | None = None,
    ) -> ShardedInt4Head:
        device = shard.device
        layout = slot_layout(assets, device)
        if layout.cluster_size != 1:
            raise ValueError(
                f"ShardedFlashHead.build: stage 1 head_int4 needs clusters of one token, the "
                f"assets have clusters of {layout.cluster_size}"
            )
        c, n_spc = layout.n_clusters, layout.n_special_clusters
        token = layout.slot_ids.to(torch.int64)  # [c + n_spc]: one token per block
        token_holders(token, vocab_start, vocab_end, comm)
        cluster_of_token = torch.empty(assets.vocab_size, dtype=torch.int64, device=device)
        cluster_of_token[token[:c]] = torch.arange(c, device=device)
        local = shard_index(shard, vocab_start, vocab_end)  # stage 2 reads vLLM's own shard
        meta = ClusterIndex(
            wc=shard[:0],
            slot_ids=layout.slot_ids,
            slot_home=layout.slot_home,
            cent_q=torch.zeros(c, 0, dtype=torch.int8, device=device),
            cent_scale=torch.zeros(0, dtype=torch.float32, device=device),
            n_clusters=c,
            cluster_size=1,
            n_special_clusters=n_spc,
        )
        head = cls(
            meta,
            local,
            vocab_start,
            assets,
            comm,
            shard.numel() * shard.element_size(),
            quantize_int4_rows(local.wc),
            cluster_of_token[vocab_start:vocab_end].contiguous(),
            backend,
            options,
        )
        prepare_int4_stage1(head._ops, head.rows4, shard, head._buffers)
        return head

    # -- what the handler reads --------------------------------------------------------------
    @property
    def sent_bytes_per_row(self) -> int:
        """The all-reduce of the candidate scores, plus the all-gather of the local top-p."""
        return super().sent_bytes_per_row + 4 * 2 * self.n_probes

    @property
    def extra_bytes(self) -> int:
        """Int4 rows (and the backend's cached form of them), slot ids and maps. The candidate
        rows themselves are vLLM's shard: no copy."""
        tensors = [
            self.rows4.q,
            self.rows4.scale,
            self.rows4.zero,
            self.local_clusters,
            self.meta.slot_ids,
            self.meta.slot_home,
            self.local.slot_ids,
            self.local.slot_home,
        ]
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + reference.stage1_cache_bytes(self._buffers)

    def uses_dense(self, n_rows: int, device: torch.device | None = None) -> bool:
        """The single-rank rule on this rank's share of the head: every rank scores all the
        candidate slots (the ones it does not hold cost a masked row each)."""
        return dispatch.prefer_dense(
            self.backend,
            device or self.local.wc.device,
            n_rows,
            self.candidate_rows,
            self.vocab_size // self.world_size,
            self.options.dense_min_batch,
            self.meta.n_clusters,
            self.measured_min_batch,
        )

    # -- one step ----------------------------------------------------------------------------
    def _select(
        self,
        h: torch.Tensor,
        inv_t: torch.Tensor | None,
        temperature: torch.Tensor | None,
        generators: Sequence[torch.Generator | None] | None,
    ) -> torch.Tensor:
        n_rows, p, c = h.shape[0], self.n_probes, self.meta.n_clusters
        noise = draw_gumbel(n_rows, c, temperature, generators, h.device)
        keys = self._ops.probe_keys_int4(
            h,
            self.rows4,
            inv_t if noise is not None else None,
            None if noise is None else noise[:, self.local_clusters],
            buffers=self._buffers,
        )
        k = min(p, keys.shape[1])
        values, ids = local_top(keys, self.local_clusters, k)
        # [B, 2p]: keys then cluster ids (float32: exact below 2^24), -inf / -1 padding where
        # this rank holds fewer than p tokens.
        send = torch.full((n_rows, 2 * p), float("-inf"), device=h.device)
        send[:, p:] = -1.0
        send[:, :k] = values
        send[:, p : p + k] = ids.float()
        got = self.comm.all_gather(send).view(self.world_size, n_rows, 2 * p)
        values = got[:, :, :p].permute(1, 0, 2).reshape(n_rows, -1)
        ids = got[:, :, p:].permute(1, 0, 2).reshape(n_rows, -1).to(torch.int64)
        return select_gathered(values, ids, p, c, self.meta.n_special_clusters)


def local_top(
    keys: torch.Tensor, clusters: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k], cluster ids [B, k]): the k largest keys of each row, ties at the
    threshold to the smallest cluster id (`clusters` [n]: the cluster of each column), as the
    single-rank select breaks them. Ties are common (torch's CPU int4 kernel returns bf16), but
    only a few keys sit exactly at a row's threshold: those rows are mended one by one. Long
    rows are first narrowed to the blocks that can hold their top k (`reference.top_blocks`)."""
    narrowed = reference.top_blocks(keys, k)
    if narrowed is None:
        clusters = clusters.expand(keys.shape[0], -1)
    else:
        keys, clusters = keys.gather(1, narrowed), clusters[narrowed]
    top = keys.topk(k, dim=1, sorted=False)
    threshold = top.values.amin(dim=1, keepdim=True)
    tied = keys == threshold
    values, ids = top.values, clusters.gather(1, top.indices)
    crossing = (tied.sum(dim=1) > (values == threshold).sum(dim=1)).nonzero().flatten()
    if len(crossing) == 0:
        return values, ids
    values, ids = values.clone(), ids.clone()
    for r in crossing.tolist():
        keep = values[r] > threshold[r]
        room = k - int(keep.sum())
        smallest = clusters[r][tied[r]].sort().values[:room]
        ids[r] = torch.cat([ids[r][keep], smallest])
        values[r] = torch.cat([values[r][keep], threshold[r].expand(room)])
    return values, ids


def select_gathered(
    values: torch.Tensor, ids: torch.Tensor, n_probes: int, n_clusters: int, n_special: int
) -> torch.Tensor:
    """[B, p + n_special] probes from the ranks' gathered local top-p (`values` [B, M] keys,
    `ids` [B, M] their clusters, -inf / -1 padding; every cluster at most once per row): what
    `select_probes` returns on the full [B, c] keys (the largest p keys, ties to the smallest
    cluster id, in ascending cluster order, then the special clusters), without building the
    [B, c] keys: 11 ms a step at 8 rows x 262144 on one core."""
    by_id = ids.argsort(dim=1, stable=True)
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    best = values.argsort(dim=1, descending=True, stable=True)[:, :n_probes]
    probes = ids.gather(1, best).sort(dim=1).values
    if n_special:
        extra = torch.arange(n_clusters, n_clusters + n_special, device=ids.device)
        probes = torch.cat([probes, extra.expand(ids.shape[0], -1)], dim=1)
    return probes


__all__ = ["ShardedInt4Head", "local_top", "select_gathered"]
