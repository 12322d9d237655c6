"""FlashHead with stage 1 on the head's own int4 rows (`flash_head_stage1: head_int4`), on every
backend: the same tokens as the reference, greedy and sampled, and logits in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashhead.assets import FlashHeadAssets
from flashhead.head import FlashHead

V, D = 640, 64


def int4_head_assets(n_probes: int, specials: list[int]) -> tuple[torch.Tensor, FlashHeadAssets]:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(V, D, generator=g) * 0.1
    assets = FlashHeadAssets(
        model_dir=Path("."),
        cache_dir=Path("."),
        centroids=torch.empty(V, 0),
        assignments=torch.randperm(V, generator=g),  # any permutation: one token per cluster
        n_probes=n_probes,
        special_token_ids=specials,
        stage1="head_int4",
        hidden=D,
    )
    return weight, assets


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_every_backend_picks_the_reference_tokens(backend, device):
    weight, assets = int4_head_assets(24, specials=[5, 600])
    dev = device if backend == "triton" else torch.device("cpu")
    ref = FlashHead.build(weight, assets, backend="reference")
    head = FlashHead.build(weight.to(dev), assets, backend=backend)
    assert head.index.rows4 is not None and head.cluster_size == 1
    h = torch.randn(6, D, generator=torch.Generator().manual_seed(4))
    greedy = head.tokens(h.to(dev)).cpu()
    assert torch.equal(greedy, ref.tokens(h))
    assert torch.equal(greedy, (h @ weight.T).argmax(1))  # 24 of 640 is plenty at int4
    temp = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.5, 0.0])

    def sampled(which: FlashHead, hh: torch.Tensor) -> torch.Tensor:
        gens = [torch.Generator(device=hh.device).manual_seed(10 + i) for i in range(6)]
        return which.tokens(hh, temperature=temp, generators=gens).cpu()

    if backend == "torch":
        # The CPU fast path scores in bf16 (torch's int4 kernel): its keys differ from the exact
        # fp32 ones by rounding, which may move a Gumbel draw near the cut. Seeds still repeat.
        assert torch.equal(sampled(head, h), sampled(head, h))
    else:
        assert torch.equal(sampled(head, h.to(dev)), sampled(ref, h))
    logits = head.logits(h.to(dev)).cpu()
    finite = torch.isfinite(logits)
    assert int(finite.sum(1).min()) >= 24 and bool(finite[:, [5, 600]].all())  # specials scored
    exact = h @ weight.T
    torch.testing.assert_close(logits[finite], exact[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("order", ["token order", "permuted"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_torch_backend_scores_one_token_clusters_on_the_head_itself(order, backend):
    import dataclasses

    from flashhead.head import build_index, prepare_int4_stage1

    weight, assets = int4_head_assets(24, specials=[5, 600])
    if order == "token order":  # what `flashhead convert --stage1 head-int4` writes
        assets = dataclasses.replace(assets, assignments=torch.arange(V))
    head = FlashHead.build(weight, assets, backend=backend)
    # No copy of the head: stage 2 reads the model's own rows by token id.
    assert head.index.wc.numel() == 0
    assert head.index.token_rows.data_ptr() == weight.data_ptr()
    assert head.cluster_major_bytes == 2 * 4 * head.index.slot_ids.numel()  # the slot maps only
    copy_index = build_index(weight, assets, cluster_major=True)
    with_copy = FlashHead(weight, copy_index, assets, backend=backend)
    prepare_int4_stage1(with_copy._ops, copy_index.rows4, weight, with_copy._buffers)
    assert with_copy.cluster_major_bytes > weight.numel() * weight.element_size()
    h = torch.randn(6, D, generator=torch.Generator().manual_seed(8))
    assert torch.equal(head.logits(h), with_copy.logits(h))
    temp = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.5, 0.0])

    def sampled(which: FlashHead) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(20 + i) for i in range(6)]
        return which.tokens(h, temperature=temp, generators=gens)

    assert torch.equal(sampled(head), sampled(with_copy))
    assert torch.equal(head.tokens(h), (h @ weight.T).argmax(1))
