"""Int4 rows (stage 1 on every head row at 4 bits): the quantizer, its packing, the torch
reference and CPU fast path, and the Triton kernel (interpreter on CPU, or CUDA).

The fast path's and the kernel's tolerances are error bounds derived from what each rounds (see
`_bf16_bound`), not fitted constants.
"""

from __future__ import annotations

import pytest
import torch

from flashhead.kernels import reference, triton_ops
from flashhead.kernels.dispatch import backend_ops
from flashhead.kernels.int4_rows import (
    Int4Rows,
    dequantize_int4_rows,
    int4_group_size,
    quantize_int4_rows,
    unpack_int4,
)

HAS_INT4_MM = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
)


def _head(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Random head whose rows differ in norm and offset (like real heads: rare tokens' rows are
    smaller), so groups get different scales and zeros."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=gen) * torch.rand(n, 1, generator=gen).add(0.2)
    return w + 0.3 * torch.randn(n, 1, generator=gen)


def _per_column(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)


def _abs_dot(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[B, n] sum_j |h_j w_j|: the scale of every rounding error in a dot product."""
    return h.float().abs() @ w.float().abs().t()


# ---------------------------------------------------------------------------------------------
# The quantizer


@pytest.mark.parametrize("d,group", [(64, 32), (96, 16), (576, 32), (640, 64), (128, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_error_is_at_most_half_a_step(d, group, dtype):
    w = _head(300, d, seed=d).to(dtype)
    rows = quantize_int4_rows(w, group if group != int4_group_size(d) else None)
    assert rows.group == group and rows.n_rows == 300 and rows.hidden_size == d
    assert rows.q.shape == (300, d // 2) and rows.q.dtype == torch.uint8
    assert rows.scale.shape == rows.zero.shape == (300, d // group)
    deq = dequantize_int4_rows(rows)
    scale = _per_column(rows.scale, group)
    zero = _per_column(rows.zero, group)
    # Half a step, plus fp32 rounding of `q * scale + zero` (a few ulps of its magnitude).
    slack = 4 * torch.finfo(torch.float32).eps * (zero.abs() + 15 * scale)
    assert ((w.float() - deq).abs() <= scale / 2 + slack).all()
    # Asymmetric: each group's min and max are codes 0 and 15 (its endpoints come back to
    # within rounding).
    codes = unpack_int4(rows.q).view(300, -1, group)
    assert (codes.amin(dim=2) == 0).all() and (codes.amax(dim=2) == 15).all()
    assert torch.equal(rows.zero, w.float().view(300, -1, group).amin(dim=2))
    assert dequantize_int4_rows(rows, torch.bfloat16).dtype == torch.bfloat16


def test_quantizer_leaves_a_float32_input_untouched():
    w = _head(20, 64)
    before = w.clone()
    quantize_int4_rows(w)
    assert torch.equal(w, before)


def test_quantizer_blocks_give_the_same_rows(monkeypatch):
    import flashhead.kernels.int4_rows as int4_rows

    w = _head(100, 64, seed=3)
    whole = quantize_int4_rows(w)
    monkeypatch.setattr(int4_rows, "_BLOCK_ELEMENTS", 7 * 64)  # blocks of 7 rows, ragged end
    blocked = quantize_int4_rows(w)
    assert torch.equal(whole.q, blocked.q)
    assert torch.equal(whole.scale, blocked.scale) and torch.equal(whole.zero, blocked.zero)
    assert torch.equal(dequantize_int4_rows(whole), dequantize_int4_rows(blocked))


def test_constant_groups_dequantize_exactly():
    w = _head(4, 64, seed=1)
    w[0] = 0.3  # a constant row
    w[1, 32:] = -1.7  # one constant group (the high half's) in an otherwise varied row
    w[2] = 0.0
    rows = quantize_int4_rows(w, 32)
    for r, g in [(0, 0), (0, 1), (1, 1), (2, 0), (2, 1)]:
        assert rows.scale[r, g] == 1.0
        assert rows.zero[r, g] == w[r, 32 * g]
    assert (rows.q[0] == 0).all() and (rows.q[2] == 0).all()
    assert ((rows.q[1] >> 4) == 0).all()  # the constant group is column j + 32: high nibbles
    deq = dequantize_int4_rows(rows)
    assert torch.equal(deq[0], w[0]) and torch.equal(deq[2], w[2])
    assert torch.equal(deq[1, 32:], w[1, 32:])


def test_packing_layout_nibble_by_nibble():
    """d = 32, groups of 16: q[i, j] holds column j (low nibble) and column j + 16 (high)."""
    j = torch.arange(16, dtype=torch.float32)
    row0 = torch.cat([j, 16 + j])  # group 0: lo 0, scale 1; group 1: lo 16, scale 1
    # group 0 descending 15.5 .. 8 (lo 8, scale 0.5, codes 15 - j); group 1 cycles 0, 2, 4, 6
    # (lo 0, scale 0.4, codes 0, 5, 10, 15).
    row1 = torch.cat([(31 - j) * 0.5, 2.0 * (j % 4)])
    rows = quantize_int4_rows(torch.stack([row0, row1]), 16)
    assert rows.q.shape == (2, 16)
    want_lo = torch.stack([j, 15 - j]).to(torch.uint8)
    want_hi = torch.stack([j, 5 * (j % 4)]).to(torch.uint8)
    for i in range(2):
        for col in range(16):
            byte = int(rows.q[i, col])
            assert byte & 15 == want_lo[i, col], (i, col, byte)
            assert byte >> 4 == want_hi[i, col], (i, col, byte)
    assert torch.equal(rows.q, want_lo | (want_hi << 4))
    assert rows.scale[0].tolist() == [1.0, 1.0] and rows.zero[0].tolist() == [0.0, 16.0]
    assert rows.zero[1].tolist() == [8.0, 0.0] and rows.scale[1, 0] == 0.5
    torch.testing.assert_close(rows.scale[1, 1], torch.tensor(6.0 / 15))
    deq = dequantize_int4_rows(rows)
    assert torch.equal(deq[0], row0) and torch.equal(deq[1, :16], row1[:16])
    torch.testing.assert_close(deq[1, 16:], row1[16:])
    assert torch.equal(unpack_int4(rows.q), torch.cat([want_lo, want_hi], dim=1))


@pytest.mark.parametrize("d,group", [(576, 32), (640, 64), (2048, 64), (96, 16), (64, 32)])
def test_group_size(d, group):
    assert int4_group_size(d) == group
    assert (d // 2) % group == 0


@pytest.mark.parametrize("d", [575, 100, 48, 0, -64])
def test_group_size_refuses_hidden_sizes_without_one(d):
    with pytest.raises(ValueError, match=f"d={d}"):
        int4_group_size(d)


def test_quantizer_refuses_groups_that_straddle_the_halves():
    with pytest.raises(ValueError, match="group 64 must divide d/2"):
        quantize_int4_rows(torch.randn(4, 96), 64)  # d/2 = 48
    rows = quantize_int4_rows(torch.randn(4, 96))
    with pytest.raises(ValueError, match="scale must be float32"):
        Int4Rows(rows.q, rows.scale[:, :3], rows.zero, rows.group)


# ---------------------------------------------------------------------------------------------
# The torch reference and the CPU fast path


def _bf16_bound(h: torch.Tensor, rows: Int4Rows, ref: torch.Tensor) -> torch.Tensor:
    """What the fast path may differ from the reference by, per key. torch's int4 kernel rounds
    h to bf16 (|dh_j| <= u|h_j|, u = 2^-8 relative spacing / 2 = 2^-9), the scale and zero2 =
    zero + 8 scale to bf16 (each dequantized value moves by <= u(|zero2| + 8 scale)), and the
    result to bf16 (<= u|key|); the products are summed in fp32 (negligible here). The dense
    fallback rounds the dequantized rows to h's dtype instead (covered by the same bound). Two
    u for second-order terms and summation order."""
    u = 2.0**-9
    group = rows.group
    scale = _per_column(rows.scale, group)
    zero2 = _per_column(rows.zero, group) + 8 * scale
    deq = dequantize_int4_rows(rows)
    per_elem = deq.abs() + zero2.abs() + 8 * scale
    return 2 * u * (_abs_dot(h, per_elem) + ref.abs()) + 1e-6


def _check_fast(h: torch.Tensor, rows: Int4Rows, buffers: dict) -> None:
    ref = reference.probe_keys_int4(h, rows)
    fast = reference.probe_keys_int4(h, rows, fast=True, buffers=buffers)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    bound = _bf16_bound(h, rows, ref)
    assert ((fast - ref).abs() <= bound).all(), float(((fast - ref).abs() / bound).max())
    # The bound guarantees a near-max pick: the fast argmax is within two bounds of the best
    # reference key. The bound is a worst case (errors measured at 5-12% of it, fixed seeds),
    # so on these rows the argmax is the same token.
    picked = ref.gather(1, fast.argmax(dim=1, keepdim=True)).squeeze(1)
    slack = 2 * bound.gather(1, ref.argmax(dim=1, keepdim=True)).squeeze(1)
    assert (picked >= ref.max(dim=1).values - slack).all()
    assert torch.equal(fast.argmax(dim=1), ref.argmax(dim=1))


@pytest.mark.parametrize("n,d", [(1000, 128), (496, 576), (64, 640)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_cpu_path_matches_the_reference(n, d, dtype):
    rows = quantize_int4_rows(_head(n, d, seed=n))
    buffers: dict = {}
    h_all = torch.randn(8, d, generator=torch.Generator().manual_seed(5)).to(dtype)
    for n_rows in (1, 2, 8):
        _check_fast(h_all[:n_rows], rows, buffers)
    if HAS_INT4_MM:  # torch's int4 kernel served these shapes (groups of 32/64), built once
        assert list(buffers) == [("int4pack", rows.group)]


def test_reference_is_the_dense_product_of_the_dequantized_rows(monkeypatch):
    rows = quantize_int4_rows(_head(300, 64, seed=9))
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    want = h @ dequantize_int4_rows(rows).t()
    torch.testing.assert_close(reference.probe_keys_int4(h, rows), want, rtol=0, atol=0)
    monkeypatch.setattr(reference, "_INT4_REF_ROWS", 64)  # blocked over rows, ragged end
    torch.testing.assert_close(reference.probe_keys_int4(h, rows), want, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="columns"):
        reference.probe_keys_int4(torch.randn(1, 32), rows)


@pytest.mark.skipif(not HAS_INT4_MM, reason="this torch has no CPU int4 kernel")
def test_fast_path_packs_in_blocks_and_pads_the_rows(monkeypatch):
    """Packed in blocks of rows (no whole-head int32 copy) with a tail padded to 16 rows."""
    monkeypatch.setattr(reference, "_INT4_PACK_ROWS", 64)
    rows = quantize_int4_rows(_head(203, 64, seed=4))
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    buffers: dict = {}
    _check_fast(h, rows, buffers)
    packed, scales_and_zeros = buffers[("int4pack", 32)]
    assert packed.shape[0] == 208 and scales_and_zeros.shape == (2, 208, 2)


def test_fast_path_falls_back_to_a_dequantized_copy(monkeypatch):
    # Groups of 16 (d = 96) are not among torch's int4 kernel's groups.
    rows = quantize_int4_rows(_head(200, 96, seed=6))
    assert rows.group == 16
    h = torch.randn(4, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    buffers: dict = {}
    _check_fast(h, rows, buffers)
    assert list(buffers) == [("int4_dequant", torch.bfloat16)]
    # fp32 rows above the batch threshold take the fp32 GEMM (exact up to summation order).
    monkeypatch.setattr(reference, "_INT4_MM_MAX_BATCH_FP32", 2)
    rows = quantize_int4_rows(_head(200, 128, seed=7))
    h = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    buffers = {}
    got = reference.probe_keys_int4(h, rows, fast=True, buffers=buffers)
    assert list(buffers) == [("int4_dequant", torch.float32)]
    ref = reference.probe_keys_int4(h, rows)
    scale = 1e-5 * _abs_dot(h, dequantize_int4_rows(rows)) + 1e-6
    assert ((got - ref).abs() <= scale).all()


def _sampling(n_rows: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    temps = torch.tensor([0.0, 0.7, 1.3, 0.0, 2.0, 0.5, 1.0, 0.9] * 16)[:n_rows]
    inv_t = torch.where(temps > 0, 1.0 / temps.clamp_min(1e-6), torch.zeros_like(temps))
    u = torch.rand(n_rows, n, generator=torch.Generator().manual_seed(seed)).clamp_(1e-10, 1)
    return inv_t, -torch.log(-torch.log(u))


def test_perturbation_matches_probe_keys():
    rows = quantize_int4_rows(_head(100, 64, seed=2))
    h = torch.randn(5, 64, generator=torch.Generator().manual_seed(6))
    inv_t, noise = _sampling(5, 100, seed=1)
    plain = reference.probe_keys_int4(h, rows)
    keys = reference.probe_keys_int4(h, rows, inv_t, noise)
    assert torch.equal(keys, reference._perturb(plain, inv_t, noise))
    assert torch.equal(keys[0], plain[0]) and torch.equal(keys[3], plain[3])  # greedy rows
    assert not torch.equal(keys[1], plain[1])


# ---------------------------------------------------------------------------------------------
# The Triton kernel


@pytest.mark.parametrize(
    "n,d",
    [(1100, 64), (300, 96), (200, 576), (48, 32)],
    ids=["2-blocks-d64", "groups-of-16", "d576", "tiny"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(device, n, d, dtype):
    rows = quantize_int4_rows(_head(n, d, seed=d))
    rows_dev = rows.to(device)
    h_all = torch.randn(8, d, generator=torch.Generator().manual_seed(d)).to(dtype)
    for n_rows, sampling in [(1, False), (3, True), (8, False), (8, True)]:
        h = h_all[:n_rows]
        inv_t, noise = _sampling(n_rows, n, seed=n_rows) if sampling else (None, None)
        want = reference.probe_keys_int4(h, rows, inv_t, noise)
        got = triton_ops.probe_keys_int4(
            h.to(device),
            rows_dev,
            None if inv_t is None else inv_t.to(device),
            None if noise is None else noise.to(device),
        ).cpu()
        assert got.dtype == torch.float32 and got.shape == (n_rows, n)
        # Same fp32 math in another order (scale * (q . h) + zero * sum(h) per group): rounding
        # of the magnitudes involved, times inv_t (<= 2) for sampled rows. On a GPU the
        # fp32 dot is 3-pass tf32 (~fp32); bf16 h is exact in the dot either way.
        scale = 1e-5 * _abs_dot(h, dequantize_int4_rows(rows)) * 2 + 1e-5
        assert ((got - want).abs() <= scale).all(), float(((got - want).abs() / scale).max())
        assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))


def test_triton_batches_over_several_row_blocks(device):
    """More rows than one B block (64 when interpreting)."""
    n, d = 100, 64
    rows = quantize_int4_rows(_head(n, d, seed=11))
    h = torch.randn(70, d, generator=torch.Generator().manual_seed(11))
    inv_t, noise = _sampling(70, n, seed=3)
    want = reference.probe_keys_int4(h, rows, inv_t, noise)
    got = triton_ops.probe_keys_int4(
        h.to(device), rows.to(device), inv_t.to(device), noise.to(device)
    ).cpu()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_triton_refuses_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rows = quantize_int4_rows(torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        triton_ops.probe_keys_int4(torch.randn(1, 64), rows)


def test_triton_blocks_respect_min_k(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for n_rows, n in [(1, 4), (3, 49152), (40, 262144)]:
        assert min(triton_ops._probe_int4_blocks(n_rows, n)[:2]) >= triton_ops.MIN_DOT_K
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert min(triton_ops._probe_int4_blocks(1, 4)[:2]) >= triton_ops.MIN_DOT_K


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_every_backend_offers_probe_keys_int4(device, backend):
    rows = quantize_int4_rows(_head(64, 64, seed=12))
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(12))
    want = reference.probe_keys_int4(h, rows)
    dev = device if backend == "triton" else torch.device("cpu")
    got = backend_ops(backend).probe_keys_int4(h.to(dev), rows.to(dev), buffers={}).cpu()
    assert torch.equal(got.argmax(dim=1), want.argmax(dim=1))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


# ---------------------------------------------------------------------------------------------
# What int4 rows are for: ranking the dense top-1 token near the top


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "cpu-fast"])
def test_int4_top8_holds_the_exact_argmax(fast):
    n, d, n_rows = 4096, 128, 64
    w = _head(n, d, seed=21)
    gen = torch.Generator().manual_seed(22)
    # Hidden states pointing somewhere near a few tokens (as an LM's do), plus noise.
    picks = torch.randint(0, n, (n_rows, 3), generator=gen)
    h = w[picks].sum(dim=1) + 2.0 * torch.randn(n_rows, d, generator=gen)
    dense = (h @ w.t()).argmax(dim=1)
    keys = reference.probe_keys_int4(h, quantize_int4_rows(w), fast=fast, buffers={})
    top8 = keys.topk(8, dim=1).indices
    hit = (top8 == dense.unsqueeze(1)).any(dim=1)
    assert hit.float().mean() >= 0.95, hit.float().mean()
    assert (keys.argmax(dim=1) == dense).float().mean() >= 0.8
