"""FlashHead on a vocab-parallel ``lm_head`` (vLLM tensor parallel): when a rank's shard can be
served (`shard_dense_reason`), and the sharded head over vLLM's tensor-parallel group
(`build_sharded_head`). The head itself is `flashhead.sharded_head`, which knows no vLLM."""

from __future__ import annotations

from typing import Any

import torch

from flashhead.handlers.plan import DenseReason


def tp_size(lm_head: Any) -> int:
    return int(getattr(lm_head, "tp_size", 1) or 1)


def shard_dense_reason(lm_head: Any, weight: torch.Tensor, vocab_size: int) -> DenseReason:
    """Why this rank's shard cannot be served by the sharded head ("" when it can)."""
    indices = getattr(lm_head, "shard_indices", None)
    start = getattr(indices, "org_vocab_start_index", None)
    end = getattr(indices, "org_vocab_end_index", None)
    if start is None or end is None:
        return DenseReason(
            f"tensor parallel lm_head {type(lm_head).__name__} does not say which tokens this "
            "rank holds (no shard_indices)",
            "tensor_parallel",
        )
    if int(getattr(indices, "num_added_elements", 0) or 0):
        return DenseReason(
            "tensor parallel lm_head with added vocabulary (LoRA extra tokens): the clusters "
            "cover the base vocabulary only",
            "tensor_parallel",
        )
    if weight.shape[0] < end - start or end > vocab_size:
        return DenseReason(
            f"tensor parallel shard of {weight.shape[0]} rows does not hold tokens "
            f"[{start}, {end}) of a {vocab_size}-token vocabulary",
            "tensor_parallel",
        )
    return DenseReason("")


def pp_size() -> int:
    """vLLM's pipeline-parallel size in this worker (1 outside a worker)."""
    try:
        from vllm.distributed import get_pp_group

        return int(get_pp_group().world_size)
    except Exception:  # no vLLM, or no parallel groups yet (offline tools, unit tests)
        return 1


def undeclared_parallel_reason(
    tp: int, pp: int, support: tuple[str, dict[str, str]] | None
) -> DenseReason:
    """Dense where this release's patchset does not declare the layout served: the support
    block says where FlashHead was checked at run time, and FlashHead never guesses beyond it."""
    name, declared = support if support is not None else ("none", {})
    for size, key, label, flag in (
        (tp, "tensor_parallel", "tensor parallel", "--tensor-parallel-size"),
        (pp, "pipeline_parallel", "pipeline parallel", "--pipeline-parallel-size"),
    ):
        if size > 1 and declared.get(key) != "flashhead":
            return DenseReason(
                f"{label} ({flag} {size}) is not checked at run time with this release "
                f"(patchset {name}: support.{key} {declared.get(key, 'unset')}); see the "
                "README's support table",
                key,
            )
    return DenseReason("")


def vllm_collectives() -> Any:
    """The tensor-parallel group's all-reduce (SUM) and all-gather, as vLLM itself runs them
    (its device communicator: shared memory on CPU, NCCL on GPU)."""
    from vllm.distributed import get_tp_group

    from flashhead.sharded_head import Collectives

    group = get_tp_group()
    return Collectives(
        rank=int(group.rank_in_group),
        world_size=int(group.world_size),
        all_reduce_sum=group.all_reduce,
        all_gather=lambda t: group.all_gather(t, dim=0),
    )


def build_sharded_head(lm_head: Any, weight: torch.Tensor, assets: Any) -> Any:
    """This rank's ShardedFlashHead (a collective: every rank of the group builds at once)."""
    from flashhead.sharded_head import ShardedFlashHead

    indices = lm_head.shard_indices
    return ShardedFlashHead.build(
        weight,
        int(indices.org_vocab_start_index),
        int(indices.org_vocab_end_index),
        assets,
        vllm_collectives(),
    )


_tp_rank: int | None = None  # this process's tensor-parallel rank, once its group exists


def counts_rows() -> bool:
    """Whether this process counts the rows of a step: every tensor-parallel rank computes the
    same rows, so only the first one counts them (else /metrics would show each row tp times).
    Called on every logits call: the rank is looked up until the group exists, then kept."""
    global _tp_rank
    if _tp_rank is None:
        try:
            from vllm.distributed import get_tensor_model_parallel_rank

            _tp_rank = int(get_tensor_model_parallel_rank())
        except Exception:  # no vLLM, or no parallel group yet (offline tools, unit tests)
            return True
    return _tp_rank == 0


def is_sharded(head: Any) -> bool:
    return int(getattr(head, "world_size", 1) or 1) > 1


def describe_shard(head: Any) -> str:
    info = head.describe()
    return (
        f"tensor parallel rank {info['rank']} of {info['tensor_parallel']}: scores the "
        f"{info['owned_rows']} rows of its shard in place, FlashHead adds "
        f"{info['extra_bytes'] / 2**20:.1f} MiB "
        f"({info['extra_bytes'] / max(info['shard_bytes'], 1):.2f}x this rank's head shard); "
        f"per logits row it sends {info['sent_bytes_per_row'] / 1024:.1f} KiB to the step's "
        f"collectives, where vLLM's gather of the logits sends "
        f"{info['dense_sent_bytes_per_row'] / 1024:.1f} KiB"
    )
