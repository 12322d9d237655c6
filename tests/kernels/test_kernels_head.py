"""flashhead.head.FlashHead (torch backend on CPU) and the backend dispatcher."""

from __future__ import annotations

import pytest
import torch

from flashhead import settings
from flashhead.head import FlashHead
from flashhead.kernels import dispatch
from flashhead.kernels.options import KernelOptions


@pytest.fixture
def setup(make_assets):
    weight, assets = make_assets(128, 32, 16, n_probes=4, specials=[2, 100])
    return weight, assets


def test_build_uses_first_v_rows_and_states_memory(setup):
    weight, assets = setup
    padded = torch.cat([weight, torch.randn(5, 32)])  # vLLM pads the head's rows
    head = FlashHead.build(padded, assets, backend="torch")
    assert head.vocab_size == 128 and head.weight.shape == (128, 32)
    assert head.weight.data_ptr() == padded.data_ptr()  # a view: no copy of the head itself
    assert (head.n_clusters, head.cluster_size, head.n_probes) == (16, 8, 4)
    head_bytes = 128 * 32 * 4
    # one cluster-major copy (+ one always-probed cluster of specials, int8 centroids, slot ids)
    assert head_bytes <= head.extra_bytes <= head_bytes + 8 * 32 * 4 + 16 * 32 + 8 * 136 + 64
    # the copy holds each token's row exactly once at its slot
    ids = head.index.slot_ids.long()
    live = ids[: 16 * 8] >= 0
    assert torch.equal(head.index.wc[: 16 * 8][live], weight[ids[: 16 * 8][live]])


def test_build_rejects_mismatched_weight(setup):
    weight, assets = setup
    with pytest.raises(ValueError, match=r"\[>= 128, 32\]"):
        FlashHead.build(weight[:100], assets)
    with pytest.raises(ValueError, match=r"\[>= 128, 32\]"):
        FlashHead.build(torch.randn(128, 31), assets)


def test_logits_candidates_in_place_and_neg_inf_elsewhere(setup):
    weight, assets = setup
    head = FlashHead.build(weight, assets, backend="torch")
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    cand = head.candidates(h)
    logits = head.logits(h)
    exact = h @ weight.t()
    for b in range(3):
        ids = cand.ids[b][cand.ids[b] >= 0]
        assert len(set(ids.tolist())) == len(ids)  # specials never counted twice
        assert {2, 100} <= set(ids.tolist())  # specials always scored
        finite = torch.isfinite(logits[b]).nonzero().flatten()
        assert sorted(finite.tolist()) == sorted(ids.tolist())
        torch.testing.assert_close(logits[b, ids], exact[b, ids], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(dim=1), head.tokens(h))


def test_logits_transform_touches_candidates_only(setup):
    weight, assets = setup
    head = FlashHead.build(weight, assets, backend="torch")
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    plain = head.logits(h)

    def softcap(x):  # tanh(-inf) would be -1: the fill must stay -inf
        return 3.0 * torch.tanh(x / 3.0)

    capped = head.logits(h, transform=softcap)
    live = torch.isfinite(plain)
    torch.testing.assert_close(capped[live], softcap(plain[live]))
    assert torch.isneginf(capped[~live]).all()


def test_logits_dense_rows_out_buffer(setup):
    weight, assets = setup
    head = FlashHead.build(weight, assets, backend="torch")
    h = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    out = torch.full((4, 128), 7.0)
    dense_rows = torch.tensor([False, True, False, True])
    res = head.logits(h, dense_rows=dense_rows, out=out, transform=lambda x: x * 2)
    assert res is out
    torch.testing.assert_close(out[dense_rows], 2 * (h[dense_rows] @ weight.t()))
    assert torch.isneginf(out[~dense_rows]).any(dim=1).all()
    with pytest.raises(ValueError, match=r"out must be \[4, 128\]"):
        head.logits(h, out=torch.empty(4, 127))


def test_logits_sampling_rows_use_their_generator(setup):
    weight, assets = setup
    head = FlashHead.build(weight, assets, backend="torch")
    h = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    temp = torch.tensor([5.0, 0.0])

    def run(seed):
        gens = [torch.Generator().manual_seed(seed), None]
        return torch.isfinite(head.logits(h, temperature=temp, generators=gens))

    assert torch.equal(run(1), run(1))
    assert torch.equal(run(1)[1], torch.isfinite(head.logits(h))[1])  # greedy row: top-p probes


def test_cpu_large_batches_go_dense(setup):
    weight, assets = setup
    fixed = KernelOptions(dense_min_batch=4)
    head = FlashHead.build(weight, assets, backend="torch", options=fixed)
    h = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    assert head.uses_dense(4) and not head.uses_dense(3)
    assert torch.equal(head.tokens(h), (h @ weight.t()).argmax(dim=1))  # exact dense answer
    assert torch.isfinite(head.logits(h)).all()
    never = FlashHead.build(
        weight, assets, backend="torch", options=KernelOptions(dense_min_batch=0)
    )
    assert not never.uses_dense(1000)
    # The rule: dense once B x K >= 2 V (K = (4 probes + 1 special cluster) x 8 = 40 rows).
    head = FlashHead.build(weight, assets, backend="torch", options=KernelOptions())
    assert head.candidate_rows == 40
    assert not head.uses_dense(6) and head.uses_dense(7)  # 7 x 40 >= 2 x 128
    assert not head.uses_dense(7, torch.device("cuda"))  # the torch backend on GPU: never
    assert dispatch.prefer_dense("triton", "cuda", 4, 40, 128) and not dispatch.prefer_dense(
        "triton", "cuda", 3, 40, 128
    )  # Triton: dense once B x K >= V


def test_gpu_heads_with_too_many_clusters_go_dense():
    """On a GPU the per-row select over more than GPU_MAX_FAST_CLUSTERS centroid keys costs more
    than the dense head (measured: 65536 keys, 230 us against 82 us): dense at any batch, unless
    the user fixes the rule (FLASHHEAD_DENSE_MIN_BATCH=0: never dense)."""
    limit = dispatch.GPU_MAX_FAST_CLUSTERS
    assert dispatch.prefer_dense("triton", "cuda", 1, 40, 10**6, None, limit + 1)
    assert not dispatch.prefer_dense("triton", "cuda", 1, 40, 10**6, None, limit)
    assert not dispatch.prefer_dense("triton", "cuda", 1, 40, 10**6, 0, limit + 1)
    assert not dispatch.prefer_dense("torch", "cpu", 1, 40, 10**6, None, limit + 1)  # CPU: no
    assert "4 rows x 40 candidates >= 1 x V=128" in dispatch.dense_reason(
        "triton", "cuda", 4, 40, 128
    )
    assert (
        dispatch.dense_reason("torch", "cpu", 4, 40, 10**6, 3)
        == "4 rows >= FLASHHEAD_DENSE_MIN_BATCH=3"
    )
    report = dispatch.describe_backend("cuda", KernelOptions(backend="auto"))
    if report["backend"] == "triton":
        assert str(limit) in report["gpu_max_clusters"]


def test_head_takes_the_process_settings_unless_given_options(setup, monkeypatch):
    weight, assets = setup
    monkeypatch.setenv("FLASHHEAD_DENSE_MIN_BATCH", "4")
    settings.reset_for_tests()
    assert FlashHead.build(weight, assets, backend="torch").uses_dense(4)
    own = FlashHead.build(weight, assets, backend="torch", options=KernelOptions(dense_min_batch=0))
    assert not own.uses_dense(4)


def test_bad_inputs(setup):
    weight, assets = setup
    head = FlashHead.build(weight, assets, backend="torch")
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        head.tokens(torch.randn(2, 31))
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        head.tokens(torch.randn(2, 32).double())
    with pytest.raises(ValueError, match="temperature has 1 entries for 2 rows"):
        head.tokens(torch.randn(2, 32), temperature=torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"n_probes must be in \[1, 16\]"):
        head.candidates(torch.randn(2, 32), n_probes=17)


def test_dispatch_options():
    with pytest.raises(dispatch.BackendError, match="triton, torch"):
        dispatch.resolve_backend("cuda-magic", "cpu")
    with pytest.raises(ValueError, match="triton, torch"):
        KernelOptions(backend="cuda-magic")
    assert dispatch.resolve_backend(None, "cpu", KernelOptions(backend="torch")) == "torch"
    info = dispatch.describe_backend("cpu", KernelOptions())
    assert info["backend"] == "torch" and info["reason"] == "no CUDA device"
    assert info["dense_min_batch"] is None and "B x K" in info["dense_fallback"]
    info = dispatch.describe_backend("cpu", KernelOptions(dense_min_batch=0))
    assert info["dense_fallback"].startswith("never")
    assert (
        dispatch.describe_backend("cpu", KernelOptions(cpu_compile=False))["cpu_gather_dot"]
        == "disabled"
    )


def test_dispatch_forced_triton_without_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(dispatch.BackendError, match="needs CUDA"):
        dispatch.resolve_backend(None, "cpu", KernelOptions(backend="triton"))


@pytest.mark.slow
def test_compiled_cpu_gather_dot_matches_reference(make_assets, monkeypatch):
    """The torch.compile'd CPU path (default outside these tests) gives the reference's tokens."""
    from flashhead.kernels import reference

    monkeypatch.setattr(reference, "_COMPILE_STATE", {})
    monkeypatch.setattr(reference, "COMPILE_MIN_ELEMENTS", 0)  # compile even this tiny head
    weight, assets = make_assets(128, 32, 16, n_probes=4, specials=[2])
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.float32, torch.bfloat16):
        fast = FlashHead.build(
            weight.to(dtype), assets, backend="torch", options=KernelOptions(cpu_compile=True)
        )
        ref = FlashHead.build(weight.to(dtype), assets, backend="reference")
        got = fast.candidates(h.to(dtype), n_probes=16)
        want = ref.candidates(h.to(dtype), n_probes=16)
        assert torch.equal(got.ids, want.ids)
        live = want.ids >= 0
        torch.testing.assert_close(got.scores[live], want.scores[live], rtol=1e-5, atol=1e-4)
    assert reference.cpu_compile_status() == "enabled"
    assert reference._COMPILE_STATE["fn"] is not None


def test_cpu_stage1_never_reuses_another_heads_centroids(make_assets):
    """Heads built one after another (convert's probe sweeps, eval, two models in a process) each
    score their own centroids on the CPU fast path, even when a freed head's memory is reused:
    the dequantized centroids were once cached by address, and a new head got stale scores."""
    from flashhead.kernels import reference

    h = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))  # B > 2: dequantized path
    for seed in range(6):
        weight, assets = make_assets(128, 32, 16, n_probes=4, seed=seed)
        head = FlashHead.build(weight, assets, backend="torch")
        i = head.index
        want = reference.probe_keys(h, i.cent_q, i.cent_scale)
        for _ in range(2):  # the first call fills the cache, the second reads it
            keys = head._ops.probe_keys(
                h, i.cent_q, i.cent_scale, None, None, buffers=head._buffers
            )
            torch.testing.assert_close(keys, want, rtol=1e-2, atol=2e-2)
        del head, i, weight, assets


@pytest.mark.parametrize("case", ["distinct", "tie-at-threshold", "ties-everywhere"])
def test_reference_select_probes_is_the_p_largest_ties_to_smallest_id(case):
    from flashhead.kernels import reference

    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(4, 500, generator=gen)
    if case == "tie-at-threshold":
        keys[:, 100:300] = keys[:, 100:101]
    elif case == "ties-everywhere":
        keys = torch.round(keys * 2) / 2
    p = 60
    got = reference.select_probes(keys, p, n_special_clusters=1)
    for row in range(keys.shape[0]):
        order = sorted(range(500), key=lambda i: (-float(keys[row, i]), i))
        assert got[row, :p].tolist() == sorted(order[:p])
    assert (got[:, p] == 500).all()
