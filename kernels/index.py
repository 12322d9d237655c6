"""The cluster index both backends read, and the token id of every candidate slot.

Kept apart from `reference` so that the Triton path imports no torch reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashhead.kernels.int4_rows import Int4Rows


@dataclass
class ClusterIndex:
    """Everything both backends read. Built once per process by `flashhead.head.FlashHead.build`.

    `wc` holds `n_clusters` clusters followed by `n_special_clusters` always-probed clusters made
    of the special tokens' rows; slots without a token have id -1 and a zero row. With clusters
    of one token the torch backend keeps no such copy: `wc` is empty and stage 2 reads each
    candidate's row of the head itself (`token_rows`) by token id.
    """

    wc: torch.Tensor  # [c_ext * s, d] head dtype, cluster-major
    slot_ids: torch.Tensor  # [c_ext * s] int32 token id per slot, -1 = padding
    slot_home: torch.Tensor  # [c_ext * s] int32 home cluster of a special slot's token, else -1
    cent_q: torch.Tensor  # [c, d] int8 ([c, 0] when stage 1 scores `rows4`)
    cent_scale: torch.Tensor  # [c] float32
    n_clusters: int
    cluster_size: int
    n_special_clusters: int
    # Stage 1 on the head's own rows (clusters of one token): an `int4_rows.Int4Rows` of the
    # head's rows in cluster order (the first n_clusters slots), scored instead of the
    # centroids. None: centroids.
    rows4: Int4Rows | None = None
    # [>= V, d] the model's own head (a view, never a copy), read by token id when `wc` is empty.
    token_rows: torch.Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.wc.shape[1])


def stage2_rows(
    index: ClusterIndex, probes: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N, s, d], picks [B, P']): stage 2's candidate rows are `rows[picks]`, in the slot
    order of `ids` (`candidate_ids(index, probes)`): the probed clusters of `wc`, or, without a
    cluster-major copy, the head's rows of the candidates' token ids (padding and duplicated
    specials read row 0, which their id -1 masks)."""
    if index.token_rows is not None:
        return index.token_rows.unsqueeze(1), ids.clamp_min(0)
    return index.wc.view(-1, index.cluster_size, index.hidden_size), probes


def special_duplicates(index: ClusterIndex, probes: torch.Tensor) -> torch.Tensor:
    """[B, n_special_clusters * s] bool: special slot whose token's home cluster is probed."""
    c, s = index.n_clusters, index.cluster_size
    home = index.slot_home[c * s :].to(torch.int64)  # [S]
    regular = probes[:, : probes.shape[1] - index.n_special_clusters]  # [B, p]
    return (home.view(1, -1, 1) == regular.unsqueeze(1)).any(dim=2) & (home >= 0)


def candidate_ids(index: ClusterIndex, probes: torch.Tensor) -> torch.Tensor:
    """[B, K] int64 token id per candidate slot (-1: padding or duplicated special)."""
    s = index.cluster_size
    slots = probes.unsqueeze(2) * s + torch.arange(s, device=probes.device)
    ids = index.slot_ids.to(torch.int64)[slots.reshape(probes.shape[0], -1)]
    if index.n_special_clusters:
        dup = special_duplicates(index, probes)
        ids[:, ids.shape[1] - dup.shape[1] :].masked_fill_(dup, -1)
    return ids
