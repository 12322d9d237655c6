"""Triton FlashHead kernels: the same two steps as `reference.py`, with the same semantics.

- `_probe_keys_kernel`: stage 1 (int8 centroids, fp32 accumulate, per-centroid scale) fused with
  the Gumbel perturbation of sampled rows, so selection reads finished keys. Top-p selection
  itself is `_select_kernel` (one program per row; a global top-p needs all keys anyway).
- `_probe_keys_int4_kernel`: stage 1 on int4 rows (`int4_rows.Int4Rows`: every vocabulary row at
  4 bits, per-group scale and zero). Each K step is one group of packed columns: `x & 15` is
  that group of the row's first half, `x >> 4` the same group of its second half, each with
  one scale and zero per row. The codes 0..15 go into the dot unscaled (exact in bf16/fp16, so
  the GPU dot multiplies exactly in h's dtype), and the group applies after it:
  `key += scale * (q . h_g) + zero * sum(h_g)`, all in fp32; the perturbation is fused as above.
- `_select_kernel`: exact top-p per row by bisection on order-preserving integer keys, ties to
  the smallest cluster id, written in ascending cluster order plus the special clusters.
- `_candidates_kernel`: stage 2 fused with the argmax / Gumbel-max pick. Each program scores
  `CPB` probed clusters of one row (gathered straight from the cluster-major copy), masks
  padding and duplicated special tokens, and folds its best (key, token) into one int64 per row
  with `tl.atomic_max` (order-preserving float bits in the high word, `0x7FFFFFFF - token` in the
  low word: ties go to the smallest token id); the row's last program decodes the token.

Launched only for CUDA tensors, or for CPU tensors under `TRITON_INTERPRET=1` (tests). Values
are upcast to float32 right after `tl.load` (the interpreter computes bf16 wrongly). Stage 1's
`tl.dot` is exact fp32 (`ieee`) in the interpreter; on the GPU it multiplies in h's 16-bit dtype
(int8 centroids are exact there, so the products are exact and summed in fp32) or, for fp32 h,
with 3-pass tf32. Sums run in a different order than torch's, so scores agree to rounding and
token ids agree except on exact near-ties.
Block sizes are per platform: large blocks when interpreting (each program costs milliseconds
there), small ones on the GPU (enough programs to fill the SMs at B=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashhead.kernels.index import ClusterIndex, candidate_ids
from flashhead.kernels.int4_rows import Int4Rows
from flashhead.kernels.logit_transform import LogitTransform
from flashhead.kernels.options import DEFAULT_OPTIONS, SELECT_METHODS, KernelOptions
from flashhead.kernels.triton_mode import triton_interpreting

MIN_DOT_K = 16  # NVIDIA tl.dot needs K >= 16 (the interpreter accepts less: check it here)


def _interpreting() -> bool:
    return triton_interpreting()


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"flashhead Triton kernels need CUDA tensors (got {t.device}); "
                "use FLASHHEAD_BACKEND=torch or set TRITON_INTERPRET=1 before importing triton"
            )


@triton.jit
def _probe_keys_kernel(
    h_ptr, q_ptr, scale_ptr, invt_ptr, noise_ptr, out_ptr,
    B, C, D, stride_h, stride_q, stride_n, stride_o,
    HAS_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_MODE: tl.constexpr,
):  # fmt: skip
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mb = rb < B
    mc = rc < C
    # acc[c, b] = q[c, :] . h[b, :]: the big int8 tile is the dot's A operand in its natural
    # (K-contiguous) layout; only the small h tile is transposed.
    acc = tl.zeros((BLOCK_C, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        md = rd < D
        hv = tl.load(
            h_ptr + rb[:, None] * stride_h + rd[None, :], mask=mb[:, None] & md[None, :], other=0.0
        )
        qv = tl.load(
            q_ptr + rc[:, None] * stride_q + rd[None, :], mask=mc[:, None] & md[None, :], other=0
        )
        if DOT_MODE == 0:  # interpreter: exact fp32 (its bf16 dot is wrong)
            acc += tl.dot(qv.to(tl.float32), tl.trans(hv.to(tl.float32)), input_precision="ieee")
        elif DOT_MODE == 1:  # bf16/fp16 h: int8 is exact in h's dtype, products exact, fp32 sum
            acc += tl.dot(qv.to(hv.dtype), tl.trans(hv))
        else:  # fp32 h: 3-pass tf32 on tensor cores, ~fp32 accuracy
            acc += tl.dot(qv.to(tl.float32), tl.trans(hv), input_precision="tf32x3")
    scale = tl.load(scale_ptr + rc, mask=mc, other=0.0)
    _store_keys(
        acc * scale[:, None], rb, rc, mb, mc, invt_ptr, noise_ptr, out_ptr, stride_n, stride_o,
        HAS_NOISE,
    )  # fmt: skip


@triton.jit
def _store_keys(
    keys, rb, rc, mb, mc, invt_ptr, noise_ptr, out_ptr, stride_n, stride_o,
    HAS_NOISE: tl.constexpr,
):  # fmt: skip
    """Stage 1's epilogue, shared by both stage-1 kernels: keys [rows rc, batch rb] perturbed for
    sampled rows (`keys * inv_t + gumbel` where inv_t > 0), stored [b, c]."""
    mask = mc[:, None] & mb[None, :]
    if HAS_NOISE:
        inv_t = tl.load(invt_ptr + rb, mask=mb, other=0.0)
        nz = tl.load(noise_ptr + rb[None, :] * stride_n + rc[:, None], mask=mask, other=0.0)
        keys = tl.where(inv_t[None, :] > 0, keys * inv_t[None, :] + nz, keys)
    tl.store(out_ptr + rb[None, :] * stride_o + rc[:, None], keys, mask=mask)


@triton.jit
def _candidates_kernel(
    h_ptr, wc_ptr, slot_ids_ptr, slot_home_ptr, probes_ptr, invt_ptr, noise_ptr, scores_ptr, best_ptr,
    count_ptr, tokens_ptr, logits_ptr, N_PROG, D, P, P_REG, stride_h, stride_w, stride_p, stride_n,
    stride_s, stride_l, logit_scale, soft_cap,
    S: tl.constexpr, SP: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_PR: tl.constexpr, HAS_SPECIAL: tl.constexpr, HAS_NOISE: tl.constexpr,
    WANT_SCORES: tl.constexpr, WANT_BEST: tl.constexpr, WANT_LOGITS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    j = tl.program_id(1)
    rn = j * ROWS + tl.arange(0, ROWS)  # slots of the padded [P, SP] layout; ROWS may be < SP
    pj = rn // SP  # probe index in the row
    within = rn % SP
    valid = (pj < P) & (within < S)
    cid = tl.load(probes_ptr + b * stride_p + pj, mask=valid, other=0).to(tl.int64)
    slot = cid * S + within
    tok = tl.load(slot_ids_ptr + slot, mask=valid, other=-1)
    acc = tl.zeros((ROWS,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        md = rd < D
        hv = tl.load(h_ptr + b * stride_h + rd, mask=md, other=0.0).to(tl.float32)
        w = tl.load(
            wc_ptr + slot[:, None] * stride_w + rd[None, :],
            mask=valid[:, None] & md[None, :],
            other=0.0,
        )
        acc += tl.sum(w.to(tl.float32) * hv[None, :], axis=1)
    if HAS_SPECIAL:
        # A special token whose home cluster is probed is already a candidate: mask the copy.
        home = tl.load(slot_home_ptr + slot, mask=valid, other=-1)
        rp = tl.arange(0, BLOCK_PR)
        reg = tl.load(probes_ptr + b * stride_p + rp, mask=rp < P_REG, other=-2)
        hit = (home[:, None] == reg[None, :]) & (home[:, None] >= 0)
        dup = tl.sum(hit.to(tl.int32), axis=1) > 0
        tok = tl.where(dup, -1, tok)
    live = tok >= 0
    score = tl.where(live, acc, float("-inf"))
    k = pj * S + within  # candidate slot, same order as reference.candidate_ids
    if WANT_SCORES:
        tl.store(scores_ptr + b * stride_s + k, score, mask=valid)
    if WANT_LOGITS:
        # vLLM's logits row, straight from the scores: each live token has exactly one slot
        # (duplicated specials are masked above), so a plain store needs no scatter-max.
        val = acc
        if HAS_SOFTCAP:
            # tanh through exp (no libdevice in the interpreter), in the overflow-safe form.
            y = val / soft_cap
            e = tl.exp(-2.0 * tl.abs(y))
            t = (1.0 - e) / (1.0 + e)
            val = tl.where(y >= 0, t, -t) * soft_cap
        if HAS_SCALE:
            val = val * logit_scale
        tl.store(logits_ptr + b.to(tl.int64) * stride_l + tok, val, mask=valid & live)
    if WANT_BEST:
        key = score
        if HAS_NOISE:
            inv_t = tl.load(invt_ptr + b)
            nz = tl.load(noise_ptr + b * stride_n + k, mask=valid, other=0.0)
            key = tl.where(inv_t > 0, acc * inv_t + nz, score)
        key = tl.where(live, key, float("-inf"))
        top = tl.max(key, axis=0)
        low = tl.max(tl.where(live & (key == top), 0x7FFFFFFF - tok, -1), axis=0)
        bits = top.to(tl.int32, bitcast=True)
        ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        packed = (ordered.to(tl.int64) << 32) | low.to(tl.int64)
        tl.atomic_max(best_ptr + b, packed, mask=low >= 0)
        # The row's last program to finish decodes the token and resets the row's best and
        # counter for the next call (no fill or decode launches; CUDA-graph friendly).
        done = tl.atomic_add(count_ptr + b, 1)
        if done == N_PROG - 1:
            val = tl.atomic_xchg(best_ptr + b, -9223372036854775807 - 1)
            tl.store(tokens_ptr + b, 0x7FFFFFFF - (val - ((val >> 32) << 32)))
            tl.atomic_xchg(count_ptr + b, 0)


@triton.jit
def _ordered_keys(keys_ptr, b, stride_k, C, BLOCK: tl.constexpr):
    """Row b's keys as int32 ordered like the floats; padding below every real key (only a NaN
    pattern maps to INT32_MIN)."""
    rc = tl.arange(0, BLOCK)
    valid = rc < C
    x = tl.load(keys_ptr + b * stride_k + rc, mask=valid, other=0.0)
    bits = x.to(tl.int32, bitcast=True)
    u = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return rc, valid, tl.where(valid, u, -2147483647 - 1)


@triton.jit
def _store_selection(
    out_ptr, b, stride_o, rc, valid, u, thr, C, P, N_SPECIAL, BLOCK_S: tl.constexpr
):  # fmt: skip
    """Keep every key above the threshold `thr` and the first tied ones up to P, compacted in
    ascending cluster order, then the special-token clusters."""
    above = (u > thr) & valid
    tied = (u == thr) & valid
    room = P - tl.sum(above.to(tl.int32), axis=0)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
    pos = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + b * stride_o + pos, rc.to(tl.int64), mask=chosen)
    rs = tl.arange(0, BLOCK_S)
    tl.store(out_ptr + b * stride_o + P + rs, (C + rs).to(tl.int64), mask=rs < N_SPECIAL)


@triton.jit
def _select_kernel(
    keys_ptr, out_ptr, C, P, N_SPECIAL, stride_k, stride_o,
    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # One program per row: bisect on order-preserving integer keys for the p-th largest value.
    b = tl.program_id(0)
    rc, valid, u = _ordered_keys(keys_ptr, b, stride_k, C, BLOCK)
    # Bisection for T = the largest t with count(u >= t) >= P, over [min, max] of the row's keys
    # (int64 scalars so that mid never overflows; every mid lies in that int32 range). A mid
    # that takes exactly P keys is as good a threshold as T (nothing at or above it is left
    # out, nothing below it is taken): the search stops there, after ~17 of the 32 steps for
    # 8016 keys (each step is a block-wide count).
    lo = tl.min(tl.where(valid, u, 2147483647), axis=0).to(tl.int64)
    hi = tl.max(u, axis=0).to(tl.int64)
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        count = tl.sum((u >= mid.to(tl.int32)).to(tl.int32), axis=0)
        lo = tl.where(count >= P, mid, lo)
        hi = tl.where(count == P, mid, tl.where(count >= P, hi, mid - 1))
    _store_selection(out_ptr, b, stride_o, rc, valid, u, lo.to(tl.int32), C, P, N_SPECIAL, BLOCK_S)


@triton.jit
def _select_radix_kernel(
    keys_ptr, out_ptr, C, P, N_SPECIAL, stride_k, stride_o,
    BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # Same contract as _select_kernel; the threshold comes from a radix select instead of a
    # 32-step bisection: 4 passes, each a 256-bin histogram of the next byte of the keys that
    # still share the threshold's prefix. Pending a GPU timing against the bisection
    # (FLASHHEAD_TRITON_SELECT=radix; scripts/gpu_check.sh times both).
    b = tl.program_id(0)
    rc, valid, u = _ordered_keys(keys_ptr, b, stride_k, C, BLOCK)
    bins = tl.arange(0, 512)
    need = P  # keys still to take at or above the threshold, among those matching the prefix
    live = valid  # keys whose bytes so far equal the threshold's
    thr = 0  # the threshold's bytes found so far, as a signed int32 prefix
    for k in tl.static_range(4):
        shift = 24 - 8 * k
        if k == 0:
            digit = ((u >> 24) + 128) & 0xFF  # sign byte, reordered so 0..255 ascends
        else:
            digit = (u >> shift) & 0xFF
        # Keys off the prefix go to bins 256..511, which are ignored (no masked histogram needed).
        hist = tl.histogram(tl.where(live, digit, 256 + (rc & 255)), 512)
        hist = tl.where(bins < 256, hist, 0)
        at_or_above = tl.cumsum(hist, axis=0, reverse=True)  # keys with digit >= bin
        pick = tl.sum((at_or_above >= need).to(tl.int32), axis=0) - 1
        above_pick = tl.sum(tl.where(bins == pick + 1, at_or_above, 0), axis=0)
        need = need - above_pick
        live = live & (digit == pick)
        if k == 0:
            thr = (pick - 128) << 24
        else:
            thr = thr | (pick << shift)
    _store_selection(out_ptr, b, stride_o, rc, valid, u, thr, C, P, N_SPECIAL, BLOCK_S)


MAX_SELECT_CLUSTERS = 1 << 16  # keys per row held in one program's registers


def _check_cluster_major(index: ClusterIndex) -> None:
    if index.token_rows is not None:
        raise ValueError(
            "this cluster index has no cluster-major copy (built for the torch backend: "
            "flashhead.head.build_index(..., cluster_major=False)); the Triton kernels read one"
        )


def select_probes(
    keys: torch.Tensor,
    n_probes: int,
    n_special_clusters: int = 0,
    method: str | None = None,
    *,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Top-p clusters per row; semantics of `reference.select_probes`. `method` (bisect or
    radix) overrides `options.triton_select`."""
    _check_device(keys)
    n_rows, c = keys.shape
    block = max(16, _pow2(c))
    if c > MAX_SELECT_CLUSTERS:
        from flashhead.kernels.reference import select_probes as torch_select

        return torch_select(keys, n_probes, n_special_clusters)
    keys = keys.contiguous()
    out = torch.empty(n_rows, n_probes + n_special_clusters, dtype=torch.int64, device=keys.device)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    if options.triton_select_warps and not _interpreting():
        warps = options.triton_select_warps
    method = method or options.triton_select
    if method not in SELECT_METHODS:
        raise ValueError(f"select method {method!r}: expected one of {', '.join(SELECT_METHODS)}")
    kernel = _select_radix_kernel if method == "radix" else _select_kernel
    kernel[(n_rows,)](
        keys, out, c, n_probes, n_special_clusters, keys.stride(0), out.stride(0),
        BLOCK=block, BLOCK_S=max(16, _pow2(n_special_clusters)), num_warps=warps,
    )  # fmt: skip
    return out


def _probe_blocks(
    n_rows: int, c: int, d: int, options: KernelOptions = DEFAULT_OPTIONS
) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_D, num_warps, num_stages) for stage 1."""
    if _interpreting():
        return (
            min(max(16, _pow2(n_rows)), 64),
            min(max(16, _pow2(c)), 1024),
            min(max(16, _pow2(d)), 512),
            4,
            1,
        )
    if options.triton_stage1_blocks:
        return options.triton_stage1_blocks
    # Small C blocks: c=8016 gives 251 programs to cover 132 SMs at B=1 (H200 sweep: 12.6 us).
    return (16 if n_rows <= 16 else 32), 32, 256, 4, 4


def _dot_mode(dtype: torch.dtype) -> int:
    if _interpreting():
        return 0
    return 1 if dtype in (torch.bfloat16, torch.float16) else 2


def probe_keys(
    h: torch.Tensor,
    cent_q: torch.Tensor,
    cent_scale: torch.Tensor,
    inv_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    buffers: dict | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Stage 1 keys [B, c] float32; semantics of `reference.probe_keys` (`buffers` unused)."""
    _check_device(h, cent_q)
    n_rows, d = h.shape
    c = cent_q.shape[0]
    block_b, block_c, block_d, warps, stages = _probe_blocks(n_rows, c, d, options)
    assert block_d >= MIN_DOT_K and block_b >= 16 and block_c >= 16, "tl.dot needs K, M, N >= 16"
    h = h.contiguous()
    out = torch.empty(n_rows, c, dtype=torch.float32, device=h.device)
    has_noise = inv_t is not None and noise is not None
    nz = noise.contiguous() if has_noise else out
    it = inv_t.contiguous() if has_noise else out
    grid = (triton.cdiv(c, block_c), triton.cdiv(n_rows, block_b))
    _probe_keys_kernel[grid](
        h, cent_q, cent_scale, it, nz, out,
        n_rows, c, d, h.stride(0), cent_q.stride(0), nz.stride(0), out.stride(0),
        HAS_NOISE=has_noise, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d,
        DOT_MODE=_dot_mode(h.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@triton.jit
def _probe_keys_int4_kernel(
    h_ptr, q_ptr, scale_ptr, zero_ptr, invt_ptr, noise_ptr, out_ptr,
    B, N, HALF, stride_h, stride_q, stride_g, stride_n, stride_o,
    GROUP: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP)
    mb = rb < B
    mn = rn < N
    rn64 = rn.to(tl.int64)
    n_half_groups = HALF // GROUP  # groups per half: the high half's group g is g + this
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for g in range(0, n_half_groups):
        k0 = g * GROUP
        # One packed tile [BLOCK_N, GROUP] holds this group of both halves (the quantizer never
        # lets a group straddle them): columns k0.. in the low nibbles, HALF + k0.. in the high.
        x = tl.load(
            q_ptr + rn64[:, None] * stride_q + (k0 + rk)[None, :], mask=mn[:, None], other=0
        )
        h_lo = tl.load(
            h_ptr + rb[:, None] * stride_h + (k0 + rk)[None, :], mask=mb[:, None], other=0.0
        )
        h_hi = tl.load(
            h_ptr + rb[:, None] * stride_h + (HALF + k0 + rk)[None, :], mask=mb[:, None], other=0.0
        )
        lo = x & 15
        hi = x >> 4
        if DOT_MODE == 0:  # interpreter: exact fp32 (its bf16 dot is wrong)
            h_lo = h_lo.to(tl.float32)
            h_hi = h_hi.to(tl.float32)
            dot_lo = tl.dot(lo.to(tl.float32), tl.trans(h_lo), input_precision="ieee")
            dot_hi = tl.dot(hi.to(tl.float32), tl.trans(h_hi), input_precision="ieee")
        elif DOT_MODE == 1:  # bf16/fp16 h: codes 0..15 are exact in h's dtype, fp32 sum
            dot_lo = tl.dot(lo.to(h_lo.dtype), tl.trans(h_lo))
            dot_hi = tl.dot(hi.to(h_hi.dtype), tl.trans(h_hi))
        else:  # fp32 h: 3-pass tf32 on tensor cores, ~fp32 accuracy
            dot_lo = tl.dot(lo.to(tl.float32), tl.trans(h_lo), input_precision="tf32x3")
            dot_hi = tl.dot(hi.to(tl.float32), tl.trans(h_hi), input_precision="tf32x3")
        sum_lo = tl.sum(h_lo.to(tl.float32), axis=1)
        sum_hi = tl.sum(h_hi.to(tl.float32), axis=1)
        sz = rn64 * stride_g + g
        s_lo = tl.load(scale_ptr + sz, mask=mn, other=0.0)
        z_lo = tl.load(zero_ptr + sz, mask=mn, other=0.0)
        s_hi = tl.load(scale_ptr + sz + n_half_groups, mask=mn, other=0.0)
        z_hi = tl.load(zero_ptr + sz + n_half_groups, mask=mn, other=0.0)
        acc += s_lo[:, None] * dot_lo + z_lo[:, None] * sum_lo[None, :]
        acc += s_hi[:, None] * dot_hi + z_hi[:, None] * sum_hi[None, :]
    _store_keys(
        acc, rb, rn, mb, mn, invt_ptr, noise_ptr, out_ptr, stride_n, stride_o, HAS_NOISE
    )  # fmt: skip


def _probe_int4_blocks(
    n_rows: int, n: int, options: KernelOptions = DEFAULT_OPTIONS
) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, num_warps, num_stages) for stage 1 on int4 rows; the K step is the
    group. `options.triton_stage1_blocks` overrides it too (its BLOCK_D is ignored)."""
    if _interpreting():
        return min(max(16, _pow2(n_rows)), 64), min(max(16, _pow2(n)), 1024), 4, 1
    if options.triton_stage1_blocks:
        block_b, block_n, _, warps, stages = options.triton_stage1_blocks
        return block_b, block_n, warps, stages
    # Untimed on a GPU yet: stage 1's centroid shape (small N blocks: 49152 rows give 1536
    # programs at B=1).
    return (16 if n_rows <= 16 else 32), 32, 4, 4


def probe_keys_int4(
    h: torch.Tensor,
    rows: Int4Rows,
    inv_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    buffers: dict | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Stage 1 keys [B, n] float32 on int4 rows; semantics of `reference.probe_keys_int4`
    (`buffers` unused)."""
    _check_device(h, rows.q)
    n_rows, d = h.shape
    if d != rows.hidden_size:
        raise ValueError(f"h has {d} columns, the int4 rows {rows.hidden_size}")
    if rows.group < MIN_DOT_K or (d // 2) % rows.group:
        raise ValueError(f"int4 group {rows.group}: need a multiple of {MIN_DOT_K} dividing d/2")
    n = rows.n_rows
    block_b, block_n, warps, stages = _probe_int4_blocks(n_rows, n, options)
    assert block_b >= 16 and block_n >= 16, "tl.dot needs M, N >= 16"
    h = h.contiguous()
    q = rows.q.contiguous()
    scale = rows.scale.contiguous()
    zero = rows.zero.contiguous()
    out = torch.empty(n_rows, n, dtype=torch.float32, device=h.device)
    has_noise = inv_t is not None and noise is not None
    nz = noise.contiguous() if has_noise else out
    it = inv_t.contiguous() if has_noise else out
    grid = (triton.cdiv(n, block_n), triton.cdiv(n_rows, block_b))
    _probe_keys_int4_kernel[grid](
        h, q, scale, zero, it, nz, out,
        n_rows, n, d // 2, h.stride(0), q.stride(0), scale.stride(0), nz.stride(0), out.stride(0),
        GROUP=rows.group, HAS_NOISE=has_noise, BLOCK_B=block_b, BLOCK_N=block_n,
        DOT_MODE=_dot_mode(h.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def _row_state(
    buffers: dict, n_rows: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (best, counter) buffers of the fused pick. Kernels leave them reset (best =
    INT64_MIN, counter = 0), so they are allocated once and reused: one stream per FlashHead."""
    key = ("triton_row_state", str(device))
    state = buffers.get(key)
    if state is None or state[0].numel() < n_rows:
        size = max(n_rows, 64)
        best = torch.full((size,), torch.iinfo(torch.int64).min, dtype=torch.int64, device=device)
        state = buffers[key] = (best, torch.zeros(size, dtype=torch.int32, device=device))
    return state


def _candidate_blocks(
    n_probes: int, sp: int, d: int, options: KernelOptions = DEFAULT_OPTIONS
) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK_D, num_warps, num_stages) for stage 2."""
    if _interpreting():
        return _pow2(n_probes) * sp, min(max(16, _pow2(d)), 512), 4, 1
    if options.triton_stage2_blocks:
        return options.triton_stage2_blocks
    # 4 rows per program (1024 programs at B=1, p=256, s=16), H200 sweep: 15.2 us B=1, 48.6 us B=8.
    return 4, min(1024, max(16, _pow2(d))), 4, 2


def candidate_scores(
    h: torch.Tensor,
    index: ClusterIndex,
    probes: torch.Tensor,
    inv_t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    want_tokens: bool = True,
    want_scores: bool = True,
    buffers: dict | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Stage 2 (ids, scores, tokens); semantics of `reference.candidate_scores`.

    With `want_scores=False` only the tokens are computed (ids and scores are None)."""
    _check_device(h, index.wc, probes)
    _check_cluster_major(index)
    n_rows, d = h.shape
    n_probe = probes.shape[1]
    s = index.cluster_size
    sp = _pow2(s)
    k = n_probe * s
    rows, block_d, warps, stages = _candidate_blocks(n_probe, sp, d, options)
    h = h.contiguous()
    probes = probes.contiguous()
    device = h.device
    scores = torch.empty(n_rows, k, dtype=torch.float32, device=device) if want_scores else None
    best = count = tokens = None
    if want_tokens:
        best, count = _row_state(buffers if buffers is not None else {}, n_rows, device)
        tokens = torch.empty(n_rows, dtype=torch.int64, device=device)
    has_noise = want_tokens and inv_t is not None and noise is not None
    dummy = index.cent_scale
    nz = noise.contiguous() if has_noise else dummy
    p_reg = n_probe - index.n_special_clusters
    grid = (n_rows, triton.cdiv(n_probe * sp, rows))
    _candidates_kernel[grid](
        h, index.wc, index.slot_ids, index.slot_home, probes,
        inv_t.contiguous() if has_noise else dummy, nz,
        scores if want_scores else dummy, best if want_tokens else dummy,
        count if want_tokens else dummy, tokens if want_tokens else dummy, dummy, grid[1],
        d, n_probe, p_reg, h.stride(0), index.wc.stride(0), probes.stride(0),
        nz.stride(0) if has_noise else 0, scores.stride(0) if want_scores else 0, 0, 1.0, 1.0,
        S=s, SP=sp, ROWS=rows, BLOCK_D=block_d, BLOCK_PR=_pow2(max(p_reg, 1)),
        HAS_SPECIAL=index.n_special_clusters > 0, HAS_NOISE=has_noise,
        WANT_SCORES=want_scores, WANT_BEST=want_tokens, WANT_LOGITS=False, HAS_SOFTCAP=False,
        HAS_SCALE=False, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    ids = candidate_ids(index, probes) if want_scores else None
    return ids, scores, tokens


def candidate_logits(
    h: torch.Tensor,
    index: ClusterIndex,
    probes: torch.Tensor,
    out: torch.Tensor,
    transform: LogitTransform | None = None,
    *,
    buffers: dict | None = None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """vLLM's logits rows [B, V] float32 in `out`: the (transformed) candidate scores at their
    token ids, -inf elsewhere; semantics of `reference.candidate_logits`. Two launches (the fill
    and stage 2), no scores or ids in memory: the logits-mode path vLLM calls every step."""
    _check_device(h, index.wc, probes, out)
    _check_cluster_major(index)
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != h.shape[0]:
        raise ValueError(
            f"out must be float32 [{h.shape[0]}, V], got {out.dtype} {list(out.shape)}"
        )
    n_rows, d = h.shape
    n_probe = probes.shape[1]
    s = index.cluster_size
    sp = _pow2(s)
    rows, block_d, warps, stages = _candidate_blocks(n_probe, sp, d, options)
    h = h.contiguous()
    probes = probes.contiguous()
    out.fill_(float("-inf"))
    if n_rows == 0:
        return out
    soft_cap = transform.soft_cap if transform is not None else None
    scale = transform.scale if transform is not None else 1.0
    dummy = index.cent_scale
    p_reg = n_probe - index.n_special_clusters
    grid = (n_rows, triton.cdiv(n_probe * sp, rows))
    _candidates_kernel[grid](
        h, index.wc, index.slot_ids, index.slot_home, probes, dummy, dummy, dummy, dummy, dummy,
        dummy, out, grid[1], d, n_probe, p_reg, h.stride(0), index.wc.stride(0), probes.stride(0),
        0, 0, out.stride(0), float(scale), float(soft_cap or 1.0),
        S=s, SP=sp, ROWS=rows, BLOCK_D=block_d, BLOCK_PR=_pow2(max(p_reg, 1)),
        HAS_SPECIAL=index.n_special_clusters > 0, HAS_NOISE=False, WANT_SCORES=False,
        WANT_BEST=False, WANT_LOGITS=True, HAS_SOFTCAP=soft_cap is not None,
        HAS_SCALE=scale != 1.0, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
