"""The model-facing FlashHead: head weight + assets -> cluster index, buffers, backend dispatch.

Per call: Gumbel noise is drawn in torch (`flashhead.sampling_noise`, per-row generators) and
handed to the backend, so the torch and Triton paths pick the same token ids; the backend
computes stage 1 keys, selects the top-p clusters per row (ascending cluster order, the slot
order of the candidates; the always-probed special-token clusters last), and scores the
candidates: into vLLM's logits row (logits mode, fused with the soft cap and scale) or into the
picked token (tokens mode). On a GPU the logits path replays FlashHead's own CUDA graphs
(`flashhead.cuda_graphs`). Knows nothing of vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flashhead.assets import FlashHeadAssets
from flashhead.kernels import dispatch, reference
from flashhead.kernels.index import ClusterIndex, candidate_ids
from flashhead.kernels.int4_rows import Int4Rows
from flashhead.kernels.logit_transform import LogitTransform
from flashhead.kernels.options import KernelOptions
from flashhead.sampling_noise import draw_gumbel, inverse_temperature
from flashhead.settings import settings


@dataclass
class Candidates:
    ids: torch.Tensor  # [B, K] int64, -1 = padding slot
    scores: torch.Tensor  # [B, K] float32, -inf on padding slots


def quantize_centroids(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's int8 centroids: ([c, d] int8, [c] float32 per-centroid scale), as served."""
    cent = centroids.float()
    scale = cent.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    cent_q = torch.round(cent / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return cent_q, scale


@dataclass(frozen=True)
class SlotLayout:
    """Where every token sits in the cluster-major order: `n_clusters` blocks of `cluster_size`
    slots, then the always-probed special-token blocks. Depends on the assets only."""

    slot_ids: torch.Tensor  # [c_ext * s] int32 token per slot, -1 = padding
    slot_home: torch.Tensor  # [c_ext * s] int32 home cluster of a special slot's token, else -1
    n_clusters: int
    cluster_size: int
    n_special_clusters: int

    @property
    def n_blocks(self) -> int:
        return self.n_clusters + self.n_special_clusters


def slot_layout(assets: FlashHeadAssets, device: torch.device | str = "cpu") -> SlotLayout:
    vocab = assets.vocab_size
    assign = assets.assignments.to(device)
    c = assets.n_clusters
    sizes = torch.bincount(assign, minlength=c)
    s = int(sizes.max())
    specials = torch.tensor(assets.special_token_ids, dtype=torch.int64, device=device)
    n_spc = math.ceil(len(specials) / s) if len(specials) else 0
    c_ext = c + n_spc

    order = torch.argsort(assign, stable=True)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(vocab, device=device) - starts[assign[order]]
    slot_of_token = assign[order] * s + rank  # slot of token order[i]
    slot_ids = torch.full((c_ext * s,), -1, dtype=torch.int32, device=device)
    slot_ids[slot_of_token] = order.to(torch.int32)
    slot_home = torch.full((c_ext * s,), -1, dtype=torch.int32, device=device)
    if n_spc:
        tail = torch.arange(len(specials), device=device) + c * s
        slot_ids[tail] = specials.to(torch.int32)
        slot_home[tail] = assign[specials].to(torch.int32)
    return SlotLayout(slot_ids, slot_home, c, s, n_spc)


def build_index(
    weight: torch.Tensor, assets: FlashHeadAssets, *, cluster_major: bool = True
) -> ClusterIndex:
    """Slot ids, stage 1 (int8 centroids or int4 rows) and the cluster-major copy of the head
    (the one extra copy). `cluster_major=False` skips that copy where the clusters hold one
    token each: stage 2 then reads the candidates' rows of `weight` itself by token id (the
    torch backend; the Triton kernels read the copy)."""
    vocab, d = assets.vocab_size, assets.hidden_size
    if weight.dim() != 2 or weight.shape[0] < vocab or weight.shape[1] != d:
        raise ValueError(
            f"FlashHead.build: head weight {list(weight.shape)} does not fit the assets "
            f"(V={vocab}, d={d}); expected [>= {vocab}, {d}] (padded rows beyond V are ignored)"
        )
    if not weight.is_floating_point():
        raise ValueError(f"FlashHead.build: head weight must be floating point, got {weight.dtype}")
    device = weight.device
    layout = slot_layout(assets, device)
    c = layout.n_clusters
    token_rows = None
    if cluster_major or layout.cluster_size != 1:
        filled = layout.slot_ids >= 0
        wc = torch.zeros(layout.slot_ids.numel(), d, dtype=weight.dtype, device=device)
        wc[filled] = weight[layout.slot_ids[filled].to(torch.int64)]
        head_rows = wc[:c]  # clusters of one token: the head's rows in cluster order
    else:
        wc, token_rows = weight[:0], weight[:vocab]
        order = layout.slot_ids[:c].to(torch.int64)
        in_order = bool(torch.equal(order, torch.arange(c, device=device)))
        # `flashhead convert --stage1 head-int4` keeps token order (no copy at all here).
        head_rows = weight[:c] if in_order else weight[order]
    rows4 = None
    if assets.stage1 == "head_int4":
        from flashhead.kernels.int4_rows import quantize_int4_rows

        # Clusters of one token: stage 1 scores each of the head's rows at int4 (no centroids).
        rows4 = quantize_int4_rows(head_rows)
        cent_q = torch.zeros(c, 0, dtype=torch.int8, device=device)
        scale = torch.ones(c, dtype=torch.float32, device=device)
    else:
        cent_q, scale = quantize_centroids(assets.centroids.to(device=device))
    return ClusterIndex(
        wc=wc,
        slot_ids=layout.slot_ids,
        slot_home=layout.slot_home,
        cent_q=cent_q.contiguous(),
        cent_scale=scale.contiguous(),
        n_clusters=c,
        cluster_size=layout.cluster_size,
        n_special_clusters=layout.n_special_clusters,
        rows4=rows4,
        token_rows=token_rows,
    )


def prepare_int4_stage1(ops: Any, rows4: Int4Rows, like: torch.Tensor, buffers: dict) -> None:
    """Build the backend's stage-1 form of the int4 rows now (torch's CPU int4 pack: about a
    second for a large head), so the first request does not wait for it and `extra_bytes` shows
    it. `like`: a tensor of the hidden states' dtype and device."""
    ops.probe_keys_int4(like.new_zeros(1, rows4.hidden_size), rows4, buffers=buffers)


def check_hidden_states(h: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """`h` as both stages read it: [B, d] fp32/fp16/bf16, contiguous; else a clear error."""
    if h.dim() != 2 or h.shape[1] != hidden_size:
        raise ValueError(f"hidden states must be [B, {hidden_size}], got {list(h.shape)}")
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"hidden states must be fp32/fp16/bf16, got {h.dtype}")
    return h.contiguous()


def select_clusters(
    ops: Any,
    index: ClusterIndex,
    h: torch.Tensor,
    n_probes: int,
    inv_t: torch.Tensor | None,
    temperature: torch.Tensor | None,
    generators: Sequence[torch.Generator | None] | None,
    buffers: dict,
) -> torch.Tensor:
    """Stage 1: [B, P] the clusters each row probes (top-p centroid scores; a Gumbel-top-p draw
    at the row's temperature for rows with T > 0), the special-token clusters last."""
    noise = draw_gumbel(h.shape[0], index.n_clusters, temperature, generators, h.device)
    return probe_and_select(ops, index, h, n_probes, inv_t, noise, buffers)


def probe_and_select(
    ops: Any,
    index: ClusterIndex,
    h: torch.Tensor,
    n_probes: int,
    inv_t: torch.Tensor | None,
    noise: torch.Tensor | None,
    buffers: dict,
) -> torch.Tensor:
    """Stage 1 on noise already drawn (None: every row greedy): device work only."""
    keys = stage1_keys(ops, index, h, inv_t if noise is not None else None, noise, buffers)
    return ops.select_probes(keys, n_probes, index.n_special_clusters)


def stage1_keys(
    ops: Any,
    index: ClusterIndex,
    h: torch.Tensor,
    inv_t: torch.Tensor | None,
    noise: torch.Tensor | None,
    buffers: dict,
) -> torch.Tensor:
    """[B, c] stage 1 keys: int8 centroid scores, or int4 scores of the head's own rows."""
    if index.rows4 is not None:
        return ops.probe_keys_int4(h, index.rows4, inv_t, noise, buffers=buffers)
    return ops.probe_keys(h, index.cent_q, index.cent_scale, inv_t, noise, buffers=buffers)


class FlashHead:
    """Two-stage LM head over a cluster-major copy of the head weight. See docs/DESIGN.md."""

    def __init__(
        self,
        weight: torch.Tensor,
        index: ClusterIndex,
        assets: FlashHeadAssets,
        backend: str | None = None,
        options: KernelOptions | None = None,
    ):
        self.weight = weight  # the first V rows of the model's head (a view: no copy)
        self.index = index
        self.vocab_size = assets.vocab_size
        self.n_clusters = index.n_clusters
        self.cluster_size = index.cluster_size
        self.n_probes = assets.n_probes
        self.special_token_ids = list(assets.special_token_ids)
        # The process's settings (FLASHHEAD_BACKEND, ...) unless the caller passes its own;
        # an explicit `backend` (e.g. "reference" for tests) wins over options.backend.
        self.options = options if options is not None else settings().kernel_options()
        self.requested_backend = backend or self.options.backend
        self.backend = dispatch.resolve_backend(backend, weight.device, self.options)
        self._ops = dispatch.backend_ops(self.backend, self.options)
        self._buffers: dict = {}
        # Set by a server that timed its own dense head against this one (flashhead/crossover.py).
        self.measured_min_batch: int | None = None
        self.graphs = self._make_graphs(weight.device)

    def _make_graphs(self, device: torch.device) -> Any:
        """FlashHead's own CUDA graphs for the logits path (Triton on a GPU), or None."""
        if self.backend != "triton" or device.type != "cuda" or not self.options.cuda_graphs:
            return None
        from flashhead.cuda_graphs import HeadGraphs

        return HeadGraphs(
            self._flash_logits_into,
            hidden_size=self.index.hidden_size,
            n_clusters=self.n_clusters,
            vocab_size=self.vocab_size,
            device=device,
        )

    @classmethod
    def build(
        cls,
        weight: torch.Tensor,
        assets: FlashHeadAssets,
        *,
        backend: str | None = None,
        options: KernelOptions | None = None,
    ) -> FlashHead:
        weight = weight.detach()
        options = options if options is not None else settings().kernel_options()
        # The torch backend reads one-token clusters from the head itself: no copy of it.
        triton = dispatch.resolve_backend(backend, weight.device, options) == "triton"
        index = build_index(weight, assets, cluster_major=triton)
        head = cls(weight[: assets.vocab_size], index, assets, backend, options)
        if index.rows4 is not None:
            prepare_int4_stage1(head._ops, index.rows4, weight, head._buffers)
        return head

    @property
    def cluster_major_bytes(self) -> int:
        """The cluster-major copy of the head (+ its slot ids): at most one extra head, and none
        for one-token clusters on the torch backend."""
        i = self.index
        return sum(t.numel() * t.element_size() for t in (i.wc, i.slot_ids, i.slot_home))

    @property
    def extra_bytes(self) -> int:
        """Memory FlashHead adds next to the model's head (cluster-major copy + stage 1: int8
        centroids or int4 rows, and the backend's cached form of those)."""
        i = self.index
        parts = [i.wc, i.slot_ids, i.slot_home, i.cent_q, i.cent_scale]
        if i.rows4 is not None:
            parts += [i.rows4.q, i.rows4.scale, i.rows4.zero]
        own = sum(t.numel() * t.element_size() for t in parts)
        return own + reference.stage1_cache_bytes(self._buffers)

    @property
    def candidate_rows(self) -> int:
        """Candidate slots scored per row (probed clusters + special-token clusters) x s."""
        return (self.n_probes + self.index.n_special_clusters) * self.cluster_size

    def uses_dense(self, n_rows: int, device: torch.device | None = None) -> bool:
        """True when the dispatcher serves this batch with the dense head (faster there)."""
        return bool(self.dense_reason(n_rows, device))

    def dense_reason(self, n_rows: int, device: torch.device | None = None) -> str:
        """Why the dispatcher serves this batch with the dense head, or ""."""
        return dispatch.dense_reason(
            self.backend,
            device or self.weight.device,
            n_rows,
            self.candidate_rows,
            self.vocab_size,
            self.options.dense_min_batch,
            self.n_clusters,
            self.measured_min_batch,
        )

    # -- the two stages -------------------------------------------------------------------
    def _probes(self, h, n_probes, inv_t, generators, temperature) -> torch.Tensor:
        p = self.n_probes if n_probes is None else int(n_probes)
        if not 1 <= p <= self.n_clusters:
            raise ValueError(f"n_probes must be in [1, {self.n_clusters}], got {p}")
        return select_clusters(
            self._ops, self.index, h, p, inv_t, temperature, generators, self._buffers
        )

    def _run(self, h, n_probes, temperature, generators, want_tokens, want_scores=True):
        """Both stages on `h` already through `_check_h` (checked once per public call)."""
        inv_t = inverse_temperature(temperature, h.shape[0], h.device)
        probes = self._probes(h, n_probes, inv_t, generators, temperature)
        tok_noise = None
        if want_tokens:
            width = probes.shape[1] * self.cluster_size
            tok_noise = draw_gumbel(h.shape[0], width, temperature, generators, h.device)
        return self._ops.candidate_scores(
            h,
            self.index,
            probes,
            inv_t if tok_noise is not None else None,
            tok_noise,
            want_tokens=want_tokens,
            want_scores=want_scores,
            buffers=self._buffers,
        )

    def _check_h(self, h: torch.Tensor) -> torch.Tensor:
        return check_hidden_states(h, self.index.hidden_size)

    # -- public API -------------------------------------------------------------------------
    def candidates(
        self,
        h: torch.Tensor,
        *,
        n_probes: int | None = None,
        temperature: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> Candidates:
        h = self._check_h(h)
        ids, scores, _ = self._run(h, n_probes, temperature, generators, want_tokens=False)
        return Candidates(ids=ids, scores=scores)

    def tokens(
        self,
        h: torch.Tensor,
        *,
        temperature: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> torch.Tensor:
        """[B] int64: greedy argmax (T = 0 rows) or a sample among the candidates (T > 0)."""
        h = self._check_h(h)
        if self.uses_dense(h.shape[0], h.device):
            return self._dense_tokens(h, temperature, generators)
        _, _, tokens = self._run(
            h, None, temperature, generators, want_tokens=True, want_scores=False
        )
        return tokens

    def logits(
        self,
        h: torch.Tensor,
        *,
        temperature: torch.Tensor | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        dense_rows: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        transform: LogitTransform | Callable[[torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """[B, V] logits: candidate scores (after `transform`) in place, -inf elsewhere;
        `dense_rows` (bool [B]) rows are the exact full-head logits (after `transform`).

        float32, or `dtype` when given (vLLM's: the model dtype). `temperature` is a host
        tensor. The decode path (no `dense_rows`, no `out`) replays FlashHead's CUDA graph on a
        GPU and never reads a device value on the host."""
        h = self._check_h(h)
        n_rows, vocab = h.shape[0], self.vocab_size
        if out is not None and tuple(out.shape) != (n_rows, vocab):
            raise ValueError(f"out must be [{n_rows}, {vocab}], got {list(out.shape)}")
        dense = bool(n_rows) and self.uses_dense(n_rows, h.device)
        if n_rows and dense_rows is None and out is None:  # the decode path
            if dense:  # the dispatcher's choice: vLLM's own math
                full = torch.nn.functional.linear(h, self.weight)
                full = full if transform is None else transform(full)
                return full.to(dtype or torch.float32)
            fused = transform is None or isinstance(transform, LogitTransform)
            if self.graphs is not None and fused:
                graphed = self.graphs.logits(
                    h, temperature, generators, transform, dtype or torch.float32
                )
                if graphed is not None:
                    return graphed
        if out is None:
            out = torch.empty(n_rows, vocab, dtype=torch.float32, device=h.device)
        if n_rows == 0:
            return _as(out, dtype)  # the stages cannot run on an empty batch
        if dense:
            return _as(self._dense_logits(h, None, out, transform), dtype)
        if dense_rows is None:
            # The decode path (the handler passes FlashHead rows only): no mask to split on, so
            # no nonzero() and its device sync every step.
            return _as(self._flash_logits(h, None, temperature, generators, out, transform), dtype)
        dense = dense_rows.to(h.device, torch.bool)
        flash_idx = (~dense).nonzero().flatten()
        dense_idx = dense.nonzero().flatten()
        if len(flash_idx):
            self._flash_logits(h, flash_idx, temperature, generators, out, transform)
        if len(dense_idx):
            self._dense_logits(h, dense_idx, out, transform)
        return _as(out, dtype)

    def _flash_logits_into(
        self,
        h: torch.Tensor,
        inv_t: torch.Tensor | None,
        noise: torch.Tensor | None,
        out: torch.Tensor,
        transform: LogitTransform | None,
    ) -> None:
        """The whole FlashHead logits path on device tensors (what a CUDA graph captures):
        stage 1, the top-p select, and stage 2 writing straight into `out`."""
        probes = probe_and_select(
            self._ops, self.index, h, self.n_probes, inv_t, noise, self._buffers
        )
        self._ops.candidate_logits(h, self.index, probes, out, transform, buffers=self._buffers)

    def _flash_logits(self, h, idx, temperature, generators, out, transform) -> torch.Tensor:
        """Candidate logits of rows `idx` (None: all rows) written into those rows of `out`."""
        sub_t = None if temperature is None else torch.as_tensor(temperature).reshape(-1)
        sub_g = generators
        if idx is not None:
            h = h[idx]
            sub_t = None if sub_t is None else sub_t[idx.cpu()]
            sub_g = None if generators is None else [generators[i] for i in idx.tolist()]
        rows = out if idx is None else out.new_empty(len(idx), out.shape[1])
        if transform is None or isinstance(transform, LogitTransform):
            n = h.shape[0]
            inv_t = inverse_temperature(sub_t, n, h.device)
            noise = draw_gumbel(n, self.n_clusters, sub_t, sub_g, h.device)
            fp32 = (
                rows if rows.dtype == torch.float32 else torch.empty_like(rows, dtype=torch.float32)
            )
            self._flash_logits_into(h, inv_t, noise, fp32, transform)
            if fp32 is not rows:
                rows.copy_(fp32)
        else:  # any other callable: applied in torch to the candidate scores
            ids, scores, _ = self._run(h, None, sub_t, sub_g, want_tokens=False)
            scores = transform(scores).float().masked_fill(ids < 0, float("-inf"))
            rows.fill_(float("-inf"))
            rows.scatter_reduce_(1, ids.clamp_min(0), scores.to(rows.dtype), reduce="amax")
        if idx is not None:
            out[idx] = rows
        return out

    def _dense_logits(self, h, idx, out, transform) -> torch.Tensor:
        """Exact full-head logits of rows `idx` (None: all rows) written into `out`."""
        full = torch.nn.functional.linear(h if idx is None else h[idx], self.weight)
        if transform is not None:
            full = transform(full)
        if idx is None:
            out.copy_(full)
        else:
            out[idx] = full.to(out.dtype)
        return out

    def _dense_tokens(self, h, temperature, generators) -> torch.Tensor:
        logits = torch.nn.functional.linear(h, self.weight)
        noise = draw_gumbel(h.shape[0], self.vocab_size, temperature, generators, h.device)
        if noise is None:
            return logits.argmax(dim=1)  # in the head dtype, exactly what the dense head does
        inv_t = inverse_temperature(temperature, h.shape[0], h.device).unsqueeze(1)
        logits = logits.float()
        return torch.where(inv_t > 0, logits * inv_t + noise, logits).argmax(dim=1)

    def describe(self) -> dict:
        return {
            "cuda_graphs": self.graphs.describe() if self.graphs is not None else None,
            "backend": self.backend,
            "vocab_size": self.vocab_size,
            "n_clusters": self.n_clusters,
            "cluster_size": self.cluster_size,
            "n_probes": self.n_probes,
            "n_special_tokens": len(self.special_token_ids),
            "cluster_major_bytes": self.cluster_major_bytes,
            "extra_bytes": self.extra_bytes,
        }


def _as(logits: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return logits if dtype is None else logits.to(dtype)


__all__ = [
    "Candidates",
    "FlashHead",
    "LogitTransform",
    "SlotLayout",
    "build_index",
    "candidate_ids",
    "draw_gumbel",
    "slot_layout",
]
