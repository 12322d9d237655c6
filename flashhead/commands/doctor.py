"""`flashhead doctor [--json] [--model DIR | --url URL]`."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor",
        help="what flashhead would do in this environment, and why",
        description=(
            "Runs the plugin's registry and patch engine in this process, as `vllm serve` would "
            "(every target module imported), prints what applies, then undoes it. "
            "Exit 0 when every required patch applies (and --model, if given, is valid), else 1."
        ),
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--model", metavar="DIR", help="also check that DIR is a valid FlashHead model")
    p.add_argument(
        "--url",
        metavar="URL",
        help="instead, read a running server's /metrics (e.g. http://127.0.0.1:8000): rows by "
        "path and dense reason, shadow agreement, guard; exit 1 when unreachable or without "
        "FlashHead metrics",
    )
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    import os

    if args.url:
        from flashhead.server_report import run_server_report

        return run_server_report(args.url, as_json=args.json)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flashhead.doctor import run_doctor

    return run_doctor(as_json=args.json, model_dir=args.model)
