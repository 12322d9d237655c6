"""`flashhead convert SRC OUT`: make a FlashHead model folder from an HF folder or a GGUF file."""

from __future__ import annotations

import argparse
import sys

from flashhead.commands._args import positive_int


def _special_tokens(text: str) -> list[int] | None:
    """'' / 'auto': the tokenizer's; 'none': no always-scored tokens; else '1,2,3'."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    if text == "none":
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--special-tokens {text!r}: expected comma-separated token ids, 'auto' or 'none'"
        ) from None


def _probes(text: str) -> int | None:
    return None if text.strip().lower() == "auto" else positive_int(text)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="make a FlashHead model from a Hugging Face or GGUF model",
        description="Cluster the LM head's rows into equal-size clusters and write a FlashHead "
        "model folder (weights hard-linked or copied, tokenizer, config.json with the FlashHead "
        "architecture, <cache>/clustering_cache.safetensors). OUT is built in a temp folder next "
        "to it and renamed at the end.",
    )
    p.add_argument("src", help="Hugging Face model folder or .gguf file")
    p.add_argument("out", help="output folder (must be absent or empty unless --force)")
    p.add_argument(
        "--cluster-size",
        type=positive_int,
        default=None,
        help="tokens per cluster (4; upstream FlashHead uses 16, which reads fewer centroids "
        "but changes far more greedy answers at the same share of V scored)",
    )
    p.add_argument(
        "--probes",
        type=_probes,
        default=None,
        help="n_probes written to config.json; 'auto' (default with --centroids fit): a 90%% "
        "upper bound (bootstrap) on the smallest p reaching --target-agreement on every "
        "calibration source (prose, code, chat answers) when the centroids are fitted on the "
        "other sources only, the shift that text unlike the calibration text brings; at most "
        "--max-share of the vocabulary; otherwise clusters // 16",
    )
    p.add_argument(
        "--stage1",
        choices=("centroids", "head-int4"),
        default=None,
        help="what stage 1 scores. head-int4 (the default): every row of the head at int4, each "
        "token its own cluster (quantized when the model loads; no calibration, no centroids; "
        "--probes counts tokens, default 512). centroids: clusters of --cluster-size tokens "
        "with int8 centroids (--centroids), fewer bytes but calibrated, and it misses rare "
        "names on text unlike the calibration text (docs/convert.md). Any option that shapes "
        "centroids (--cluster-size, --centroids, --calibration-*, --chat/code/sample-tokens, "
        "--max-share, --target-agreement, --iterations) selects centroids",
    )
    p.add_argument(
        "--centroids",
        choices=("fit", "mean", "normalized"),
        default=None,
        help="stage 1 clusters and centroids: fit (default; needs transformers: hidden states "
        "sampled from text and from the model's own chat answers shape the clusters, and each "
        "centroid is the least-squares fit of its cluster's best logit), mean of the member "
        "rows, or its unit direction (upstream); mean and normalized cluster the rows by "
        "direction only",
    )
    p.add_argument(
        "--calibration-tokens",
        type=positive_int,
        default=None,
        help="positions of calibration text sampled for --centroids fit (4096)",
    )
    p.add_argument(
        "--chat-tokens",
        type=int,
        default=None,
        help="positions of the model's own greedy answers to the shipped calibration prompts, "
        "in its chat template, for --centroids fit (4096; 0: prose only, which serves chat "
        "requests far worse)",
    )
    p.add_argument(
        "--code-tokens",
        type=int,
        default=None,
        help="positions of Python standard library source code (calibration half) for "
        "--centroids fit (4096; 0: none)",
    )
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=None,
        help="positions of the model's own free samples at temperature 1, from random starting "
        "tokens, for --centroids fit (0: none, the default). Measured in docs/convert.md: a "
        "small gain on SmolLM2, and on Gemma-3-270M (a base model whose samples wander into "
        "every script of its 262k vocabulary) much worse prose and chat",
    )
    p.add_argument(
        "--max-share",
        type=float,
        default=None,
        metavar="PCT",
        help="--probes auto never scores more than this percent of the vocabulary (10)",
    )
    p.add_argument(
        "--calibration-text",
        default=None,
        metavar="FILE",
        help="UTF-8 text for sampling hidden states (default: Python's pydoc topics, "
        "the half `flashhead eval` does not use)",
    )
    p.add_argument(
        "--target-agreement",
        type=float,
        default=None,
        metavar="PCT",
        help="top-1 agreement (percent) that --probes auto aims at (99.9: a 48-token greedy "
        "answer then stays identical to dense about 95%% of the time)",
    )
    p.add_argument("--seed", type=int, default=0, help="clustering seed (deterministic)")
    p.add_argument("--iterations", type=positive_int, default=None, help="k-means iterations (8)")
    p.add_argument(
        "--special-tokens",
        type=_special_tokens,
        default=None,
        metavar="IDS",
        help="always-scored token ids, comma-separated; 'auto' (the tokenizer's special, eos "
        "and bos tokens; default) or 'none'",
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device for clustering (default: cuda if any, else cpu)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)
    return p


# Options that only shape centroids (dest, flag): giving one selects --stage1 centroids.
CENTROID_OPTIONS = (
    ("cluster_size", "--cluster-size"),
    ("centroids", "--centroids"),
    ("calibration_tokens", "--calibration-tokens"),
    ("chat_tokens", "--chat-tokens"),
    ("code_tokens", "--code-tokens"),
    ("sample_tokens", "--sample-tokens"),
    ("max_share", "--max-share"),
    ("calibration_text", "--calibration-text"),
    ("target_agreement", "--target-agreement"),
    ("iterations", "--iterations"),
)


def _resolve_stage1(args: argparse.Namespace) -> str | None:
    """--stage1 as given, else centroids when a centroid option was given, else head-int4;
    None (after printing why) for head-int4 with centroid options. Fills the options' defaults."""
    from flashhead.convert import ConvertOptions

    given = [flag for dest, flag in CENTROID_OPTIONS if getattr(args, dest) is not None]
    stage1 = args.stage1 or ("centroids" if given else "head-int4")
    if stage1 == "head-int4" and given:
        print(
            f"flashhead convert: error: {', '.join(given)} shape(s) centroids, which --stage1 "
            "head-int4 does not use. Fix: drop them, or pass --stage1 centroids",
            file=sys.stderr,
        )
        return None
    defaults = ConvertOptions()
    for dest, _ in CENTROID_OPTIONS:
        if getattr(args, dest) is None and dest != "calibration_text":
            value = getattr(defaults, dest)
            if dest in ("max_share", "target_agreement"):
                value = 100.0 * value  # the CLI takes percentages
            setattr(args, dest, value)
    return stage1


def run(args: argparse.Namespace) -> int:
    from flashhead.calibration.texts import read_text
    from flashhead.convert import ConvertError, ConvertOptions, convert

    stage1 = _resolve_stage1(args)
    if stage1 is None:
        return 2
    if not 50.0 <= args.target_agreement < 100.0:
        print(
            f"flashhead convert: error: --target-agreement {args.target_agreement}: expected a "
            "percentage in [50, 100)",
            file=sys.stderr,
        )
        return 2
    for flag in ("chat_tokens", "code_tokens", "sample_tokens"):
        if getattr(args, flag) < 0:
            name = "--" + flag.replace("_", "-")
            print(f"flashhead convert: error: {name} must be 0 or more", file=sys.stderr)
            return 2
    if not 0.0 < args.max_share <= 100.0:
        print(
            f"flashhead convert: error: --max-share {args.max_share}: expected a percentage "
            "in (0, 100]",
            file=sys.stderr,
        )
        return 2
    try:
        text = read_text(args.calibration_text, "calibration") if args.calibration_text else None
    except ValueError as exc:
        print(f"flashhead convert: error: --calibration-text: {exc}", file=sys.stderr)
        return 2
    opts = ConvertOptions(
        cluster_size=args.cluster_size,
        stage1=stage1,
        probes=args.probes,
        centroids=args.centroids,
        calibration_tokens=args.calibration_tokens,
        chat_tokens=args.chat_tokens,
        code_tokens=args.code_tokens,
        sample_tokens=args.sample_tokens,
        max_share=args.max_share / 100.0,
        calibration_text=text,
        target_agreement=args.target_agreement / 100.0,
        seed=args.seed,
        iterations=args.iterations,
        special_tokens=args.special_tokens,
        force=args.force,
        device=args.device,
        progress=not args.quiet,
    )
    try:
        result = convert(args.src, args.out, opts)
    except ConvertError as exc:
        print(f"flashhead convert: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flashhead convert: interrupted; {args.out} was not changed", file=sys.stderr)
        return 130
    print(
        f"{result.out}: {result.architecture}, V={result.vocab_size}, "
        f"{result.n_clusters} clusters, n_probes={result.n_probes}, "
        f"{len(result.special_token_ids)} special tokens, {result.seconds['total']:.1f} s"
    )
    if result.probes_capped:
        print(
            f"flashhead convert: warning: n_probes {result.n_probes} is capped by --max-share: "
            f"the held-out estimates ({result.probe_estimates}) x margin ask for more. Check the "
            f"quality with `flashhead eval {result.out}`",
            file=sys.stderr,
        )
    return 0
