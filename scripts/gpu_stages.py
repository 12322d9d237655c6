"""Per-stage GPU timings of the FlashHead core (scripts/gpu_check.sh runs it on a lent GPU).

For each head shape (Llama-3.2, Gemma-3-270M as shipped) and batch: stage 1, both top-p select
methods (bisect, radix) against torch.topk, stage 2 in logits mode (fill + fused store) and the
whole logits path, each captured in a CUDA graph and timed by triton.testing.do_bench (median).
Writes stages.json to the output folder; prints one line per (shape, batch) and, last, the
select method that was faster at every shape and batch. The radix select is timed at the
Llama shape only unless GPU_CHECK_SWEEP=1 (which also tries 8/16/32 warps): on an H200 it lost
to the bisection there (48-90 us against 22) and compiles slowly for 65536 keys.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import triton

from flashhead.bench import BenchConfig, make_problem
from flashhead.head import FlashHead
from flashhead.kernels import triton_ops
from flashhead.kernels.options import KernelOptions

SWEEP = os.environ.get("GPU_CHECK_SWEEP") == "1"  # a script's switch, not a FLASHHEAD_ setting
SHAPES = {"llama3.2": (128256, 2048, 16, 256), "gemma3": (262144, 640, 4, 912)}


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return round(
        triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3, 1
    )


def time_batch(head: FlashHead, weight: torch.Tensor, batch: int) -> dict:
    ix, p, d = head.index, head.n_probes, head.index.hidden_size
    h = (weight[:batch].float() / d**0.5).to(torch.bfloat16).contiguous()
    keys = triton_ops.probe_keys(h, ix.cent_q, ix.cent_scale)
    probes = triton_ops.select_probes(keys, p, ix.n_special_clusters)
    out = torch.empty(batch, head.vocab_size, dtype=torch.float32, device="cuda")
    row = {
        "stage1": graph_us(lambda: triton_ops.probe_keys(h, ix.cent_q, ix.cent_scale)),
        "select_bisect": graph_us(lambda: triton_ops.select_probes(keys, p, method="bisect")),
        "select_radix": graph_us(lambda: triton_ops.select_probes(keys, p, method="radix"))
        if SWEEP or d > 1024
        else None,
        "torch_topk": graph_us(lambda: keys.topk(p, dim=1, sorted=False)),
        "stage2_logits": graph_us(lambda: triton_ops.candidate_logits(h, ix, probes, out)),
        "logits_path": graph_us(lambda: head._flash_logits_into(h, None, None, out, None)),
        "dense": graph_us(lambda: torch.nn.functional.linear(h, weight)),
    }
    if SWEEP:  # the select's one program per row: how many warps pay
        for warps in (8, 16, 32):
            opts = KernelOptions(triton_select_warps=warps)
            for method in ("bisect", "radix"):
                row[f"select_{method}_w{warps}"] = graph_us(
                    lambda m=method, o=opts: triton_ops.select_probes(keys, p, method=m, options=o)
                )
    row["bisect_equals_topk"] = torch.equal(
        triton_ops.select_probes(keys, p, method="bisect").sort(dim=1).values,
        keys.topk(p, dim=1).indices.sort(dim=1).values,
    )
    return row


def main(out: Path) -> None:
    res: dict = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    faster: dict[str, bool] = {}
    for name, (vocab, d, s, p) in SHAPES.items():
        cfg = BenchConfig(vocab=vocab, hidden=d, cluster_size=s, probes=p, device="cuda")
        weight, assets = make_problem(cfg)
        head = FlashHead.build(weight, assets)
        for batch in (1, 8):
            try:
                row = time_batch(head, weight, batch)
            except Exception as exc:  # one shape's failure must not hide the others
                row = {"error": repr(exc)[:500]}
            res[f"{name}@B{batch}"] = row
            radix = row.get("select_radix")
            faster[f"{name}@{batch}"] = bool(radix and radix < row["select_bisect"])
            print(name, "B", batch, row, flush=True)
        del weight, head  # free this head before the next shape
        torch.cuda.empty_cache()
    # Where the one-program-per-row select stops paying (dispatch.GPU_MAX_FAST_CLUSTERS).
    for c in (16384,):
        keys = torch.randn(1, c, device="cuda")
        p = max(1, c // 64)
        res[f"select_bisect_c{c}_p{p}"] = graph_us(
            lambda k=keys, n=p: triton_ops.select_probes(k, n, method="bisect")
        )
        print("select over", c, "keys:", res[f"select_bisect_c{c}_p{p}"], "us", flush=True)
    res["radix_faster_everywhere"] = all(faster.values())
    (out / "stages.json").write_text(json.dumps(res, indent=1))
    print("select:", "radix" if res["radix_faster_everywhere"] else "bisect", faster)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
