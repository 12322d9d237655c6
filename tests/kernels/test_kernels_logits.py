"""Logits mode, the call vLLM makes: Triton's fused stage 2 (scores written straight into the
[B, V] row, soft cap and scale applied in the store) == the torch reference (interpreter on CPU,
or CUDA), and the head's logits path with vLLM's dtype and transforms."""

from __future__ import annotations

import pytest
import torch

from flashhead.head import FlashHead, LogitTransform
from flashhead.kernels import reference, triton_ops

TRANSFORMS = [
    None,
    LogitTransform(scale=0.5),
    LogitTransform(soft_cap=3.0),
    LogitTransform(scale=2.0, soft_cap=30.0),
]


def build(make_assets, device, dtype, specials=(0, 5, 95), unequal=True):
    weight, assets = make_assets(96, 48, 12, n_probes=3, specials=list(specials), unequal=unequal)
    weight = weight.to(device=device, dtype=dtype)
    return (
        FlashHead.build(weight, assets, backend="triton"),
        FlashHead.build(weight, assets, backend="reference"),
    )


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["plain", "scale", "softcap", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_candidate_logits_matches_reference(make_assets, device, transform, dtype):
    tri, ref = build(make_assets, device, dtype)
    h = torch.randn(5, 48, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    probes = reference.select_probes(
        reference.probe_keys(h, ref.index.cent_q, ref.index.cent_scale), 3, 1
    )
    poison = torch.full((5, 96), 123.0, device=device)  # every slot must be written
    got = triton_ops.candidate_logits(h, tri.index, probes, poison.clone(), transform)
    want = reference.candidate_logits(h, ref.index, probes, poison.clone(), transform)
    live = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), live)
    assert torch.isneginf(got[~live]).all()
    torch.testing.assert_close(got[live], want[live], rtol=1e-5, atol=1e-4)
    # The candidates: the probed clusters' tokens and the specials, each exactly once.
    ids = reference.candidate_scores(h, ref.index, probes, want_tokens=False)[0]
    for b in range(5):
        expected = sorted(i for i in ids[b].tolist() if i >= 0)
        assert sorted(live[b].nonzero().flatten().tolist()) == expected


def test_softcap_bounds_and_keeps_order(make_assets, device):
    tri, _ = build(make_assets, device, torch.float32)
    h = 40 * torch.randn(3, 48, generator=torch.Generator().manual_seed(5)).to(device)
    plain = tri.logits(h)
    capped = tri.logits(h, transform=LogitTransform(soft_cap=2.0))
    live = torch.isfinite(plain)
    assert (capped[live].abs() <= 2.0).all()
    torch.testing.assert_close(
        capped[live], 2.0 * torch.tanh(plain[live] / 2.0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_logits_in_the_model_dtype(make_assets, device, dtype):
    tri, ref = build(make_assets, device, dtype)
    h = torch.randn(4, 48, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    transform = LogitTransform(scale=0.25)
    got = tri.logits(h, transform=transform, dtype=dtype)
    assert got.dtype == dtype and got.shape == (4, 96)
    # The same as the float32 logits rounded once, and as a callable transform applied in torch.
    want = ref.logits(h, transform=transform).to(dtype)
    live = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), live)
    torch.testing.assert_close(got[live].float(), want[live].float(), rtol=2e-2, atol=1e-3)
    via_callable = ref.logits(h, transform=lambda x: x * 0.25)
    torch.testing.assert_close(via_callable, ref.logits(h, transform=transform))


def test_logits_sampled_rows_repeat_with_their_generators(make_assets, device):
    tri, _ = build(make_assets, device, torch.float32)
    h = torch.randn(3, 48, generator=torch.Generator().manual_seed(7)).to(device)
    temp = torch.tensor([0.0, 1.5, 0.8])

    def run(seed):
        gens = [None, torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        return tri.logits(h, temperature=temp, generators=gens)

    first, again = run(3), run(3)
    assert torch.equal(first, again)
    greedy = tri.logits(h)
    assert torch.equal(first[0], greedy[0])  # a greedy row ignores the noise of its neighbours
