"""`flashhead bench`: dense head vs FlashHead timing (see flashhead.bench)."""

from __future__ import annotations

import argparse
import json
import sys

from flashhead.commands._args import positive_int_list


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="dense head vs FlashHead timing",
        description="Time the dense head (F.linear + argmax) against FlashHead (tokens mode, greedy) "
        "on random clustered weights, interleaved in one process. Defaults: the Llama-3.2 head "
        "shape (V=128256, d=2048, clusters of 16, 256 probes).",
    )
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size V (default 128256)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size d (default 2048)")
    p.add_argument(
        "--batch",
        type=positive_int_list("1,8,32"),
        default=[1, 8, 32],
        help="batch sizes (default 1,8,32)",
    )
    p.add_argument("--probes", type=int, default=256, help="clusters probed per row (default 256)")
    p.add_argument("--cluster-size", type=int, default=16, help="tokens per cluster (default 16)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per method (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls (default 3)")
    p.add_argument("--no-graphs", action="store_true", help="CUDA: time eagerly, no CUDA graphs")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from flashhead.bench import BenchConfig, format_report, run_bench

    cfg = BenchConfig(
        vocab=args.vocab,
        hidden=args.hidden,
        batches=tuple(args.batch),
        probes=args.probes,
        cluster_size=args.cluster_size,
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
