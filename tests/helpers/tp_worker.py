"""One tensor-parallel rank of the sharded-head tests: a real torch.distributed (gloo) group of
processes on this machine, each holding one padded shard of a random head, as vLLM's
ParallelLMHead does. Run by tests/kernels/test_sharded_head.py through torch.multiprocessing."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

from tests.helpers.random_heads import random_assets, random_int4_assets


def shard_range(vocab: int, world: int, rank: int) -> tuple[int, int, int]:
    """(start, end, padded rows per rank), as VocabParallelEmbedding splits a padded vocab."""
    per = -(-vocab // world)
    per = -(-per // 8) * 8  # vLLM pads the vocabulary (to 64); any padding shows the same
    start = min(rank * per, vocab)
    return start, min(start + per, vocab), per


def run(rank: int, world: int, port: int, cases: dict[str, dict], out_dir: str) -> None:
    """Every case in turn, in one process group; results in OUT/<case>.rank<R>.pt."""
    try:
        os.environ.update(FLASHHEAD_DENSE_MIN_BATCH="0", FLASHHEAD_CPU_COMPILE="0")
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        for name, case in cases.items():
            result = run_case(rank, world, case)
            torch.save(result, os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as fh:
            fh.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_case(rank: int, world: int, case: dict) -> dict:
    from flashhead.head import FlashHead
    from flashhead.sharded_head import Collectives, ShardedFlashHead, ShardMismatch

    if case.get("int4"):
        weight, assets = random_int4_assets(
            case["vocab"],
            case["hidden"],
            n_probes=case["probes"],
            specials=case.get("specials"),
            seed=case.get("seed", 0),
        )
    else:
        weight, assets = random_assets(
            case["vocab"],
            case["hidden"],
            case["clusters"],
            n_probes=case["probes"],
            specials=case.get("specials"),
            unequal=case.get("unequal", False),
            seed=case.get("seed", 0),
        )
    start, end, per = shard_range(case["vocab"], world, rank)
    shard = torch.zeros(per, case["hidden"])
    shard[: end - start] = weight[start:end]

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=0)

    def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    comm = Collectives(rank, world, all_reduce_sum, all_gather)
    head = ShardedFlashHead.build(shard, start, end, assets, comm, backend="reference")
    single = FlashHead.build(weight, assets, backend="reference")

    gen = torch.Generator().manual_seed(123)
    h = torch.randn(case["rows"], case["hidden"], generator=gen)
    temperature = case.get("temperature")
    result: dict = {"extra_bytes": head.extra_bytes, "shard_bytes": head.shard_bytes}
    info = head.describe()
    result["owned_rows"] = info["owned_rows"]
    result["sent"] = (info["sent_bytes_per_row"], info["dense_sent_bytes_per_row"])

    def seeded():
        if temperature is None:
            return None, None
        t = torch.tensor(temperature, dtype=torch.float32)
        return t, [torch.Generator().manual_seed(1000 + i) for i in range(len(temperature))]

    t, g = seeded()
    if case.get("perturb_rank") == rank:
        h = h.clone()
        h[0] += 5.0 * torch.randn(case["hidden"], generator=torch.Generator().manual_seed(9))
    try:
        result["sharded"] = head.logits(h, temperature=t, generators=g)
    except ShardMismatch as exc:
        result["mismatch"] = str(exc)
    t, g = seeded()
    result["single"] = single.logits(h, temperature=t, generators=g)
    result["centroid_bytes"] = head.meta.cent_q.numel() + 4 * head.meta.cent_scale.numel()
    # The candidate rows a rank scores are vLLM's shard itself, never a copy.
    result["reads_the_shard"] = head.local.wc.data_ptr() == shard.data_ptr()
    if case.get("crossover"):
        result["crossover"] = timed_crossover(rank, shard, start, end, assets, comm)
    return result


def timed_crossover(rank, shard, start, end, assets, comm) -> tuple[int | None, list[int]]:
    """Time a torch-backend sharded head against a stand-in for vLLM's sharded dense head (the
    local GEMM, then an all-gather), with costs that differ by rank: alone, rank 0 would keep
    FlashHead at every size (FlashHead n ms, dense 1.5 n + 1) and rank 1 would go dense from one
    row (2 n against n); summed, dense is as fast from 2 rows on. Every trial is a collective on
    both sides, so ranks that disagreed on the next trial would hang."""
    from flashhead import crossover
    from flashhead.kernels.options import KernelOptions
    from flashhead.sharded_head import ShardedFlashHead

    options = KernelOptions(backend="torch", dense_min_batch=None, cpu_compile=False)
    head = ShardedFlashHead.build(shard, start, end, assets, comm, options=options)

    def dense(h: torch.Tensor) -> torch.Tensor:
        return comm.all_gather((h @ shard.T).T.contiguous()).T

    def timer(fn, h: torch.Tensor) -> float:
        fn(h)
        n = int(h.shape[0])
        if fn.__name__ == "flash":
            return n * (1 + rank) / 1e3
        return (1.5 * n + 1 if rank == 0 else n) / 1e3

    saved, crossover.time_call = crossover.time_call, timer
    try:
        found = crossover.time_head_against_dense(head, dense, None, torch.zeros(1, shard.shape[1]))
    finally:
        crossover.time_call = saved
    assert head.measured_min_batch == found.dense_from
    return found.dense_from, [t.rows for t in found.trials]
