"""`flashhead doctor [--json] [--model DIR]`."""

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
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from flashhead.doctor import run_doctor

    return run_doctor(as_json=args.json, model_dir=args.model)
