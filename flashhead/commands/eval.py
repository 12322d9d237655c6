"""`flashhead eval MODEL`: FlashHead vs dense head agreement on real text."""

from __future__ import annotations

import argparse
import json
import sys

from flashhead.commands._args import positive_int_list


def _float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v < 100 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated percentages in (0, 100) such as 99,99.5, got {text!r}"
        )
    return values


def _corpora(text: str) -> list[str]:
    from flashhead.evaluation import CORPORA

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in CORPORA for n in names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(CORPORA)}, got {text!r}"
        )
    return list(dict.fromkeys(names))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from flashhead.evaluation import DEFAULT_PROBES

    p = subparsers.add_parser(
        "eval",
        help="FlashHead vs dense head agreement on real text",
        description="Run a FlashHead model's body (transformers, CPU) over text and report, per "
        "number of probes p: the share of the vocabulary scored, top-1 agreement with the dense "
        "head, top-5 containment, and the p needed for each agreement target. Two corpora, "
        "both held out from `flashhead convert`'s calibration: prose (the half of Python's "
        "pydoc topics convert does not use, or --text) and chat (the model's own greedy "
        "answers to the held-out half of the shipped prompts, in its chat template).",
    )
    p.add_argument("model", help="FlashHead model folder (made by `flashhead convert`)")
    p.add_argument(
        "--corpus",
        type=_corpora,
        default=["prose", "chat"],
        help="corpora to evaluate, comma-separated: prose, chat (default both)",
    )
    p.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text for the prose corpus")
    p.add_argument(
        "--probes",
        type=positive_int_list("16,64,256"),
        default=list(DEFAULT_PROBES),
        help=f"p values to report (default {','.join(map(str, DEFAULT_PROBES))}; the model's "
        "own n_probes is always added)",
    )
    p.add_argument(
        "--targets",
        type=_float_list,
        default=[99.0, 99.5, 99.9],
        help="top-1 agreement targets in percent (99,99.5,99.9)",
    )
    p.add_argument(
        "--tokens", type=int, default=4096, help="positions to evaluate per corpus (4096)"
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the model body (bfloat16, as vLLM serves it)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from flashhead.assets import FlashHeadAssetError, load_assets
    from flashhead.convert.texts import read_text
    from flashhead.evaluation import evaluate, format_table

    if args.tokens < 16:
        print("flashhead eval: error: --tokens must be at least 16", file=sys.stderr)
        return 2
    try:
        assets = load_assets(args.model)
        text = read_text(args.text, "evaluation") if args.text else None
    except (FlashHeadAssetError, ValueError) as exc:
        print(f"flashhead eval: error: {exc}", file=sys.stderr)
        return 2
    probes = sorted(set(args.probes) | {assets.n_probes})
    reports = evaluate(
        args.model,
        corpora=args.corpus,
        text=text,
        probes=probes,
        targets=[t / 100.0 for t in args.targets],
        n_tokens=args.tokens,
        dtype=getattr(torch, args.dtype),
        progress=not args.quiet,
    )
    if args.json:
        print(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
    else:
        print("\n\n".join(format_table(r) for r in reports.values()))
    return 0
