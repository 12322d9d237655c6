"""`flashhead bench`: dense head vs FlashHead timing (see flashhead.bench)."""

from __future__ import annotations

import argparse
import json
import sys

from flashhead.commands._args import positive_int_list

# Kept here, not imported from flashhead.bench: the parser must not import torch.
SHAPES = {
    "llama3.2": (128256, 2048, 16, 256),
    "gemma3": (262144, 640, 4, 912),
}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="dense head vs FlashHead timing",
        description="Time the dense head against FlashHead on random clustered weights, "
        "interleaved in one process. Default: the call vLLM makes every decode step, eagerly "
        "(dense: F.linear in the model dtype; FlashHead: its logits processor's step, which "
        "replays FlashHead's own CUDA graphs on a GPU); on a GPU each method's device work is "
        "also timed captured whole in one CUDA graph. --mode tokens times the head alone "
        "(greedy token ids). Shape: --shape, else the Llama-3.2 head (V=128256, d=2048, "
        "clusters of 16, 256 probes); --vocab/--hidden/--cluster-size/--probes override it.",
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="llama3.2",
        help="head shape preset: llama3.2 (128256 x 2048, s=16, p=256) or gemma3 (262144 x 640, "
        "s=4, p=912, Gemma-3-270M as shipped)",
    )
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size V")
    p.add_argument("--hidden", type=int, default=None, help="hidden size d")
    p.add_argument(
        "--batch",
        type=positive_int_list("1,8,32"),
        default=[1, 8, 32],
        help="batch sizes (default 1,8,32)",
    )
    p.add_argument("--probes", type=int, default=None, help="clusters probed per row")
    p.add_argument("--cluster-size", type=int, default=None, help="tokens per cluster")
    p.add_argument(
        "--stage1",
        choices=["centroids", "head-int4"],
        default="centroids",
        help="stage 1: int8 centroids (default) or head-int4, every row at int4 (implies "
        "--cluster-size 1; --probes then counts tokens, default 512)",
    )
    p.add_argument(
        "--mode",
        choices=["logits", "tokens"],
        default="logits",
        help="logits: vLLM's call (default); tokens: the head alone, greedy token ids",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="logits mode: time sampled rows at this temperature (default 0: greedy)",
    )
    p.add_argument("--soft-cap", type=float, default=None, help="final logit soft cap (Gemma-2)")
    p.add_argument("--scale", type=float, default=1.0, help="logit scale (default 1)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per method (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls (default 3)")
    p.add_argument(
        "--no-graphs", action="store_true", help="GPU: skip the CUDA-graph column (eager only)"
    )
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from flashhead.bench import BenchConfig, format_report, run_bench

    vocab, hidden, cluster_size, probes = SHAPES[args.shape]
    if args.stage1 == "head-int4":  # every token its own cluster; p counts tokens
        cluster_size, probes = 1, 512
    cfg = BenchConfig(
        vocab=vocab if args.vocab is None else args.vocab,
        hidden=hidden if args.hidden is None else args.hidden,
        batches=tuple(args.batch),
        probes=probes if args.probes is None else args.probes,
        cluster_size=cluster_size if args.cluster_size is None else args.cluster_size,
        stage1=args.stage1,
        mode=args.mode,
        temperature=args.temperature,
        soft_cap=args.soft_cap,
        scale=args.scale,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        iters=args.iters,
        warmup=args.warmup,
        graphs=not args.no_graphs,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"flashhead bench: {exc}", file=sys.stderr)
        return 2
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else None
    info = run_bench(cfg, log=log)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_report(info))
    return 0
