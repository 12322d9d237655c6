"""The torch FlashHead: the reference semantics (exact fp32 math) and the CPU fast path.

Both backends (this one and `triton_ops`) implement the same steps; the Gumbel noise is drawn
in shared torch code (`flashhead.head`) and passed in:

1. `probe_keys(h, cent_q, cent_scale, inv_t, noise)` -> [B, c] float32:
   `s = (h . q_c) * scale_c` (int8 centroids, per-row scale: the paper's low-precision stage 1);
   rows with inverse temperature `inv_t > 0` get `s * inv_t + gumbel` (Gumbel-top-k), others `s`.
   `probe_keys_int4(h, rows, inv_t, noise)` -> [B, n] float32 is the same on every head row at
   int4 (`int4_rows.Int4Rows`, per-group scale and zero) instead of the centroids.
   `select_probes(keys, p, n_special_clusters)` -> [B, P] int64: the p largest keys per row (ties
   to the smallest cluster id) in ascending cluster order, then the special-token clusters.
2. `candidate_scores(h, index, probes, inv_t, noise)` -> (scores [B, K] float32, tokens [B]):
   exact scores `h . W[tok]` of every slot of the probed clusters (padding and special tokens
   already inside a probed cluster score -inf), and the picked token per row: the max of
   `score` (greedy) or `score * inv_t + gumbel` (sampled), ties to the smallest token id.

Reference math upcasts to float32 before any product (what the Triton kernels do after
`tl.load`), so both backends give the same token ids. The CPU fast path (`fast=True`) keeps the
head dtype for the products (oneDNN, fp32 accumulation, result rounded to the head dtype like the
dense head's logits) and gathers into persistent buffers, one row at a time: a fresh 16-130 MB
gather per call page-faults and costs more than the head itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flashhead.kernels.index import ClusterIndex, candidate_ids, stage2_rows
from flashhead.kernels.int4_rows import Int4Rows, dequantize_int4_rows, unpack_int4
from flashhead.kernels.logit_transform import LogitTransform


def probe_keys(
    h: torch.Tensor,
    cent_q: torch.Tensor,
    cent_scale: torch.Tensor,
    inv_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    fast: bool = False,
    buffers: dict | None = None,
) -> torch.Tensor:
    """Stage 1: [B, c] float32 centroid scores, perturbed for sampled rows (see module doc).

    `buffers` (the head's own dict) keeps the fast path's dequantized centroids between calls."""
    if fast and h.device.type == "cpu" and _int8_mm_ok(h):
        # Reads the int8 centroids (half the bytes of bf16); 2.5x faster at B=1 on 1 thread.
        scores = torch._weight_int8pack_mm(
            h.to(torch.bfloat16), cent_q, cent_scale.to(torch.bfloat16)
        ).float()
    elif fast and h.device.type == "cpu":
        cent = _dequantized(cent_q, cent_scale, h.dtype, buffers)
        scores = torch.nn.functional.linear(h, cent).float()
    else:
        scores = (h.float() @ cent_q.float().t()) * cent_scale
    return _perturb(scores, inv_t, noise)


def _perturb(
    scores: torch.Tensor, inv_t: torch.Tensor | None, noise: torch.Tensor | None
) -> torch.Tensor:
    if inv_t is None or noise is None:
        return scores
    sampled = (inv_t > 0).unsqueeze(1)
    return torch.where(sampled, scores * inv_t.unsqueeze(1) + noise, scores)


_INT8_MM_MAX_BATCH = 2  # above this, the bf16 GEMM beats torch's int8 weight-only kernel on CPU


def _int8_mm_ok(h: torch.Tensor) -> bool:
    return h.shape[0] <= _INT8_MM_MAX_BATCH and hasattr(torch, "_weight_int8pack_mm")


# The stage-1 forms `_cached` keeps in a head's buffers: memory the head adds for its life.
_STAGE1_CACHES = ("int4pack", "int4_dequant")


def stage1_cache_bytes(buffers: dict) -> int:
    """Bytes of the stage-1 forms this backend has cached in a head's `buffers` (torch's CPU int4
    pack, a dequantized copy of the int4 rows)."""
    total = 0
    for key, value in buffers.items():
        if isinstance(key, tuple) and key and key[0] in _STAGE1_CACHES:
            for t in value if isinstance(value, tuple) else (value,):
                total += t.numel() * t.element_size()
    return total


def _cached(buffers: dict | None, key: tuple, make: Callable[[], Any]) -> Any:
    # Cached in the caller's buffers (one dict per head), never in a module-level table keyed by
    # address: a new head whose centroids reuse a freed head's memory would get stale scores.
    cached = None if buffers is None else buffers.get(key)
    if cached is None:
        cached = make()
        if buffers is not None:
            buffers[key] = cached
    return cached


def _dequantized(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, buffers: dict | None
) -> torch.Tensor:
    return _cached(buffers, ("dequant", dtype), lambda: (q.float() * scale.unsqueeze(1)).to(dtype))


def probe_keys_int4(
    h: torch.Tensor,
    rows: Int4Rows,
    inv_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    fast: bool = False,
    buffers: dict | None = None,
) -> torch.Tensor:
    """Stage 1 on int4 rows: [B, n] float32 scores `h . dequant(row)` of every row, perturbed
    for sampled rows like `probe_keys`.

    Reference: exact fp32 math on the dequantized rows (blocked over rows). CPU fast path: torch's
    int4 weight-only kernel where it exists and wins (bf16 activations, scales and output, fp32
    accumulation), else a dequantized copy in h's dtype; `buffers` (the head's own dict) keeps
    either form between calls."""
    if h.shape[1] != rows.hidden_size:
        raise ValueError(f"h has {h.shape[1]} columns, the int4 rows {rows.hidden_size}")
    if fast and h.device.type == "cpu":
        if _int4_mm_ok(h, rows):
            packed, scales_and_zeros = _int4_packed(rows, buffers)
            scores = torch.ops.aten._weight_int4pack_mm_for_cpu(
                h.to(torch.bfloat16).contiguous(), packed, rows.group, scales_and_zeros
            )
            scores = scores[:, : rows.n_rows].float()
        else:
            w = _dequantized_int4(rows, h.dtype, buffers)
            scores = torch.nn.functional.linear(h, w).float()
    else:
        hf = h.float()
        scores = torch.empty(h.shape[0], rows.n_rows, dtype=torch.float32, device=h.device)
        step = _INT4_REF_ROWS
        for start in range(0, rows.n_rows, step):
            stop = min(rows.n_rows, start + step)
            scores[:, start:stop] = hf @ dequantize_int4_rows(rows.slice(start, stop)).t()
    return _perturb(scores, inv_t, noise)


_INT4_REF_ROWS = 8192  # rows dequantized at a time by the reference (8192 x 640 fp32: 21 MB)
# torch's CPU int4 kernel: the groups it supports, and its packing: N in multiples of 16 (tail
# padded with zero rows here), packed in blocks of a multiple of 64 rows (its N tile: blocks of
# 64k rows concatenate to the same bytes as one whole-head pack, without a [n, d] int32 copy).
_INT4_MM_GROUPS = (32, 64, 128, 256)
_INT4_PACK_ROWS = 4096
# When torch's int4 kernel beats the GEMM of a dequantized copy in h's dtype. Measured on this
# 2-core AVX2 machine, 1 thread, V=49152 x d=576 (groups of 32), int4 kernel vs dense GEMM:
#   bf16 h: B=1 5.0-6.5 vs 9.5-9.9 ms, B=2 5.4-6.9 vs 14-18, B=8 17-22 vs 59-71, B=32 74-84 vs
#   270-290, B=128 335 vs 987 (fp16 GEMM: 243 ms at B=32), so 16-bit h always takes it;
#   fp32 h: B=1 5.8 vs 17-20, B=2 7.1 vs 37-39, B=8 21 vs 46, B=16 47 vs 65, B=24-48 a tie
#   (72/110/123 vs 70/108/124), B=64 180 vs 100, B=128 337 vs 203. Ties go to the int4 kernel:
#   the fallback caches a full fp32 copy of the rows (670 MB for 262144 x 640).
_INT4_MM_MAX_BATCH_FP32 = 48


def _int4_mm_ok(h: torch.Tensor, rows: Int4Rows) -> bool:
    if not (
        hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
    ):
        return False
    if rows.group not in _INT4_MM_GROUPS or rows.hidden_size % rows.group:
        return False
    return h.dtype != torch.float32 or h.shape[0] <= _INT4_MM_MAX_BATCH_FP32


def _int4_packed(rows: Int4Rows, buffers: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales_and_zeros) in the layout of torch's CPU int4 kernel, cached in the
    caller's buffers (see `_dequantized`). torch dequantizes `(q - 8) * scale + zero2`, so
    zero2 = zero + 8 * scale; both are bf16 [d // group, n, 2]."""
    return _cached(buffers, ("int4pack", rows.group), lambda: _pack_int4(rows))


def _pack_int4(rows: Int4Rows) -> tuple[torch.Tensor, torch.Tensor]:
    n = rows.n_rows
    n_pad = -(-n // 16) * 16
    step = _INT4_PACK_ROWS
    parts = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        codes = unpack_int4(rows.q[start:stop]).to(torch.int32)
        if stop == n and n_pad > n:
            codes = torch.nn.functional.pad(codes, (0, 0, 0, n_pad - n))
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
    packed = torch.cat(parts) if len(parts) > 1 else parts[0]
    scale = torch.nn.functional.pad(rows.scale, (0, 0, 0, n_pad - n))
    zero = torch.nn.functional.pad(rows.zero, (0, 0, 0, n_pad - n))
    scales_and_zeros = torch.stack([scale.t(), (zero + 8 * scale).t()], dim=2)
    return packed, scales_and_zeros.to(torch.bfloat16).contiguous()


def _dequantized_int4(rows: Int4Rows, dtype: torch.dtype, buffers: dict | None) -> torch.Tensor:
    return _cached(buffers, ("int4_dequant", dtype), lambda: dequantize_int4_rows(rows, dtype))


def select_probes(keys: torch.Tensor, n_probes: int, n_special_clusters: int = 0) -> torch.Tensor:
    """[B, p + n_special_clusters] int64: per row the `n_probes` clusters with the largest keys,
    ties at the threshold to the smallest cluster id, in ascending cluster order; then the
    always-probed special-token clusters (ids c, c+1, ...)."""
    n_rows, c = keys.shape
    narrowed = top_blocks(keys, n_probes)
    if narrowed is None:
        probes = _top_positions(keys, n_probes)
    else:
        probes = narrowed.gather(1, _top_positions(keys.gather(1, narrowed), n_probes))
    if n_special_clusters:
        extra = torch.arange(c, c + n_special_clusters, device=keys.device)
        probes = torch.cat([probes, extra.expand(n_rows, -1)], dim=1)
    return probes


def _top_positions(keys: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] ascending positions of each row's k largest keys, ties at the threshold to the
    smallest positions."""
    n_rows = keys.shape[0]
    threshold = keys.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    chosen = keys >= threshold
    if bool((chosen.sum(dim=1) != k).any()):
        # Keys tied at the threshold for some row: keep the smallest positions among them.
        # (The common case skips this cumsum over every key: 4-6 ms at 8 rows x 65536.)
        above = keys > threshold
        tied = keys == threshold
        room = k - above.sum(dim=1, keepdim=True)
        chosen = above | (tied & (tied.cumsum(dim=1) <= room))
    return chosen.nonzero()[:, 1].view(n_rows, k)


# Blocks of keys `top_blocks` narrows a row to: the largest that leaves at least 8k blocks.
_TOP_BLOCK_SIZES = (32, 16, 8)


def top_blocks(keys: torch.Tensor, k: int) -> torch.Tensor | None:
    """[B, m * block] ascending positions in `keys` [B, n] (CPU) that hold every key of a row
    at or above its k-th largest, or None where narrowing would not pay.

    A row's k-th largest key is never below `floor`, the k-th largest of its block maxima, so
    the keys that matter all lie in blocks whose maximum reaches `floor`; each row keeps the
    same number m of blocks (the most any row needs; extra blocks change nothing). Positions
    stay ascending, so a top-k with ties to the smallest position on the narrowed keys equals
    one on the whole row. At 262144 keys a row, torch's top-k and its tie scan cost 4-8 ms a
    row on one core; this costs a tenth of that. Rows of many equal keys (m above half the
    blocks) take the whole row.

    Only on CPU: m is read on the host, which a GPU step must not do."""
    n_rows, n = keys.shape
    if keys.device.type != "cpu" or not n_rows:
        return None
    block = next((b for b in _TOP_BLOCK_SIZES if n % b == 0 and n // b >= 8 * k), None)
    if block is None:
        return None
    block_max = keys.reshape(n_rows, n // block, block).amax(dim=2)
    top = block_max.topk(k, dim=1, sorted=False)
    floor = top.values.amin(dim=1, keepdim=True)
    m = int((block_max >= floor).sum(dim=1).max())
    if 2 * m * block > n:
        return None
    if m > k:
        top = block_max.topk(m, dim=1, sorted=False)
    blocks = top.indices.sort(dim=1).values
    return (blocks.unsqueeze(2) * block + torch.arange(block)).view(n_rows, m * block)


def pick(
    ids: torch.Tensor,
    scores: torch.Tensor,
    inv_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B] int64: max of the (perturbed) scores per row, ties to the smallest token id."""
    keys = _perturb(scores, inv_t, noise).masked_fill(ids < 0, float("-inf"))
    best = keys.max(dim=1, keepdim=True).values
    big = torch.iinfo(torch.int64).max
    return torch.where((keys == best) & (ids >= 0), ids, big).min(dim=1).values


def candidate_scores(
    h: torch.Tensor,
    index: ClusterIndex,
    probes: torch.Tensor,
    inv_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    want_tokens: bool = True,
    want_scores: bool = True,
    fast: bool = False,
    compile: bool = True,
    buffers: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stage 2: (ids [B, K], scores [B, K] float32 with -inf on unused slots, tokens [B] | None).

    `probes` is [B, P] int64: sorted regular clusters then the special clusters. `want_scores`
    is accepted for symmetry with the Triton backend (the reference always returns them).
    `compile` lets the CPU fast path use its torch.compile'd gather-dot.
    """
    del want_scores
    ids = candidate_ids(index, probes)
    rows, picks = stage2_rows(index, probes, ids)
    if fast and h.device.type == "cpu":
        scores = _scores_rowwise(h, rows, picks, buffers if buffers is not None else {}, compile)
    else:
        picked = rows[picks].reshape(h.shape[0], -1, rows.shape[2]).float()
        scores = torch.einsum("bkd,bd->bk", picked, h.float())
    scores.masked_fill_(ids < 0, float("-inf"))
    tokens = pick(ids, scores, inv_t, noise) if want_tokens else None
    return ids, scores, tokens


def candidate_logits(
    h: torch.Tensor,
    index: ClusterIndex,
    probes: torch.Tensor,
    out: torch.Tensor,
    transform: LogitTransform | None = None,
    *,
    fast: bool = False,
    compile: bool = True,
    buffers: dict | None = None,
) -> torch.Tensor:
    """vLLM's logits rows [B, V] float32 in `out`: the candidate scores, through `transform`,
    at their token ids; -inf everywhere else (the transform never sees the padding)."""
    ids, scores, _ = candidate_scores(
        h, index, probes, want_tokens=False, fast=fast, compile=compile, buffers=buffers
    )
    if transform is not None and not transform.is_identity:
        scores = transform.apply(scores).masked_fill(ids < 0, float("-inf"))
    out.fill_(float("-inf"))
    # amax: a padding slot (id -1, clamped to 0) must not overwrite token 0's score.
    out.scatter_reduce_(1, ids.clamp_min(0), scores.to(out.dtype), reduce="amax")
    return out


def _scores_rowwise(
    h: torch.Tensor, rows: torch.Tensor, picks: torch.Tensor, buffers: dict, compile: bool
) -> torch.Tensor:
    """Per-row scores on CPU of `rows[picks[b]]` ([N, s, d] rows, `index.stage2_rows`).
    Preferred: a torch.compile'd gather-dot that reads each picked tile once, straight from
    `rows` (no gather copy; fp32 products like the reference). Fallback (no compiler, or
    `compile` off): gather into one persistent buffer + GEMV per row, which beats a batched
    gather + bmm (that gather alone is B x 17 MB at the Llama-3.2 shape, and a fresh buffer
    page-faults on every call)."""
    s, d = rows.shape[1], rows.shape[2]
    n_rows, n_pick = picks.shape
    k = n_pick * s
    scores = torch.empty(n_rows, k, dtype=torch.float32)
    # Compiling costs seconds; it only pays for heads where the per-row gather is large.
    fused = _compiled_gather_dot() if compile and k * d >= COMPILE_MIN_ELEMENTS else None
    if fused is not None:
        try:
            for b in range(n_rows):
                scores[b] = fused(rows, picks[b], h[b]).view(k)
            return scores
        except Exception as exc:  # a compiler problem must cost speed, never the answer
            _disable_compile(exc)
    key = ("gather", rows.dtype, n_pick, s)
    gather = buffers.get(key)
    if gather is None:
        gather = buffers[key] = torch.empty(n_pick, s, d, dtype=rows.dtype)
    row_out = buffers.get(("row", rows.dtype, k))
    if row_out is None:
        row_out = buffers[("row", rows.dtype, k)] = torch.empty(1, k, dtype=rows.dtype)
    hq = h.to(rows.dtype)
    flat = gather.view(k, d)
    for b in range(n_rows):
        torch.index_select(rows, 0, picks[b], out=gather)
        torch.mm(hq[b : b + 1], flat.t(), out=row_out)
        scores[b].copy_(row_out[0])
    return scores


def _gather_dot(rows: torch.Tensor, picks: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[P, s] float32 scores of the picked rows against one hidden state."""
    return (rows[picks].float() * h.float()).sum(-1)


_COMPILE_STATE: dict = {}
COMPILE_MIN_ELEMENTS = 1 << 20  # K * d per row (SmolLM2-135M: 3072 * 576 = 1.8M)


def _compiled_gather_dot():
    if "fn" in _COMPILE_STATE:
        return _COMPILE_STATE["fn"]
    try:
        # Static shapes: one kernel per (P, s, d, dtype), compiled on first use (~15 s).
        fn = torch.compile(_gather_dot, dynamic=False, fullgraph=True)
    except Exception as exc:
        _disable_compile(exc)
        return None
    _COMPILE_STATE["fn"] = fn
    return fn


def _disable_compile(exc: BaseException) -> None:
    import logging

    _COMPILE_STATE["fn"] = None
    _COMPILE_STATE["error"] = repr(exc)
    logging.getLogger("flashhead").warning(
        "flashhead: torch.compile of the CPU gather-dot failed (%r); using gather + GEMV", exc
    )


def cpu_compile_status(enabled: bool = True) -> str:
    """'enabled', 'disabled' (`enabled` False: FLASHHEAD_CPU_COMPILE=0) or 'failed: <error>'."""
    if "error" in _COMPILE_STATE:
        return f"failed: {_COMPILE_STATE['error']}"
    if not enabled:
        return "disabled"
    return "enabled"
