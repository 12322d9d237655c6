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
    from flashhead.evaluation_defaults import FAMILIES

    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(FAMILIES)
    if not names or any(n not in FAMILIES for n in names):
        raise argparse.ArgumentTypeError(
            f"expected 'all' or a comma-separated list of {', '.join(FAMILIES)}, got {text!r}"
        )
    return list(dict.fromkeys(names))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from flashhead.evaluation_defaults import DEFAULT_PROBES

    p = subparsers.add_parser(
        "eval",
        help="FlashHead vs dense head agreement on real text",
        description="Run a FlashHead model's body (transformers, CPU) over text and report, per "
        "number of probes p: the share of the vocabulary scored, top-1 agreement with the dense "
        "head, top-5 containment, and the p needed for each agreement target, for every text "
        "family (worst first), all held out from `flashhead convert`'s calibration: prose "
        "(pydoc topics), code (stdlib source), docstrings, markdown (installed packages' "
        "READMEs), qa (own answers to held-out questions), chat (own answers to held-out "
        "prompts), self (own samples at temperature 1), and --text FILE. docstrings, markdown, "
        "qa and --text are never seen by convert. --answers also compares whole greedy answers.",
    )
    p.add_argument("model", help="FlashHead model folder (made by `flashhead convert`)")
    p.add_argument(
        "--corpus",
        type=_corpora,
        default=None,
        help="text families to evaluate, comma-separated (prose, code, docstrings, markdown, "
        "qa, chat, self) or 'all' (default: all)",
    )
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="your own UTF-8 text, reported as one more family, 'text'",
    )
    p.add_argument(
        "--answers",
        type=int,
        default=20,
        metavar="N",
        help="also decode greedy answers to N held-out questions with both heads and count the "
        "identical ones (20; 0: skip)",
    )
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
        default=None,
        help="dtype of the model body (default: bfloat16, as vLLM serves it, where this CPU "
        "computes it fast (AVX-512-BF16 or AMX), else float32)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from flashhead.answers import AnswerReport, format_answers
    from flashhead.assets import FlashHeadAssetError, load_assets
    from flashhead.calibration.texts import read_text
    from flashhead.evaluation import FAMILIES, evaluate, format_summary, format_table

    if args.answers < 0:
        print("flashhead eval: error: --answers must be 0 or more", file=sys.stderr)
        return 2
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
        corpora=args.corpus or list(FAMILIES),
        text=text,
        probes=probes,
        targets=[t / 100.0 for t in args.targets],
        n_tokens=args.tokens,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        progress=not args.quiet,
        answers=args.answers,
    )
    if args.json:
        print(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=2))
        return 0
    families = [r for r in reports.values() if not isinstance(r, AnswerReport)]
    blocks = [format_summary(reports)] + [format_table(r) for r in families]
    if isinstance(reports.get("answers"), AnswerReport):
        blocks.append(format_answers(reports["answers"]))
    print("\n\n".join(b for b in blocks if b))
    return 0
