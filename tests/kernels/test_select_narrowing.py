"""The CPU select narrows long rows to the blocks that can hold their top p
(`reference.top_blocks`); the probes must be exactly those of a top-p over the whole row, ties
to the smallest cluster id, whatever the keys look like."""

import pytest
import torch

from flashhead.kernels import reference
from flashhead.sharded_int4 import local_top

P = 16
C = 8 * 8 * P * 4  # 4096 keys: blocks of 32 leave 128 blocks, the 8p that narrowing needs


def brute_force(keys: torch.Tensor, p: int) -> list[list[int]]:
    out = []
    for row in keys.tolist():
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        out.append(sorted(order[:p]))
    return out


def make_keys(case: str, rows: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(11)
    keys = torch.randn(rows, C, generator=gen)
    if case == "bf16":  # what torch's CPU int4 kernel returns: many near-threshold ties
        keys = keys.bfloat16().float()
    elif case == "one-per-block":
        # The p largest keys each alone in its block: the p-th largest key *is* the p-th
        # largest block maximum, and its ties in other blocks must still be found.
        keys = torch.rand(rows, C, generator=gen)  # below 1
        for r in range(rows):
            blocks = torch.randperm(C // 32, generator=gen)[: P + 3]
            keys[r, blocks[:P] * 32 + 5] = 2.0 + torch.arange(P, dtype=torch.float32)
            keys[r, blocks[P:] * 32 + 7] = 2.0  # tied with the p-th largest, later blocks too
    elif case == "tie-across-blocks":
        keys[:, 1000:1200] = keys[:, 3000:3001].clone().expand(-1, 200) + 2.5
    elif case == "coarse":  # a few distinct values: narrowing cannot pay, the whole row is used
        keys = torch.round(keys)
    elif case == "minus-inf":
        keys[:, : C - 3 * P] = float("-inf")
    return keys


@pytest.mark.parametrize(
    "case", ["distinct", "bf16", "one-per-block", "tie-across-blocks", "coarse", "minus-inf"]
)
def test_select_probes_on_long_rows_is_the_whole_row_top_p(case):
    keys = make_keys(case)
    got = reference.select_probes(keys, P, n_special_clusters=2)
    assert got[:, :P].tolist() == brute_force(keys, P)
    assert (got[:, P:] == torch.tensor([C, C + 1])).all()


@pytest.mark.parametrize("case", ["distinct", "bf16", "one-per-block", "tie-across-blocks"])
def test_long_rows_are_narrowed_to_a_fraction(case):
    # The tests above would pass with no narrowing at all; this one checks it happens.
    narrowed = reference.top_blocks(make_keys(case), P)
    assert narrowed is not None
    assert narrowed.shape[1] <= C // 4
    assert bool((narrowed.diff(dim=1) > 0).all())  # ascending: ties go to the smallest id


def test_rows_of_equal_keys_and_short_rows_are_not_narrowed():
    assert reference.top_blocks(make_keys("coarse"), P) is None
    assert reference.top_blocks(torch.randn(3, 8 * 8 * P - 32), P) is None  # too few blocks


@pytest.mark.parametrize("case", ["distinct", "bf16", "one-per-block", "tie-across-blocks"])
def test_a_ranks_local_top_on_long_rows_is_its_whole_shard_top(case):
    keys = make_keys(case)
    gen = torch.Generator().manual_seed(5)
    clusters = torch.randperm(2 * C, generator=gen)[:C]  # a shard's own cluster ids, shuffled
    values, ids = local_top(keys, clusters, P)
    for row in range(keys.shape[0]):
        order = sorted(range(C), key=lambda i: (-float(keys[row, i]), int(clusters[i])))
        want = sorted(int(clusters[i]) for i in order[:P])
        assert sorted(ids[row].tolist()) == want
        got_values = dict(zip(ids[row].tolist(), values[row].tolist(), strict=True))
        assert all(got_values[int(clusters[i])] == float(keys[row, i]) for i in order[:P])
