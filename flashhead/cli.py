"""The `flashhead` command line. Each subcommand lives in `flashhead.commands.<name>` and exposes
`add_parser(subparsers)`; its parser sets `func(args) -> int`. Modules are imported lazily so that
one broken or heavy subcommand (torch, transformers) never slows or breaks the others."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("flashhead.commands.doctor", "what flashhead would do in this environment, and why"),
    "patchsets": ("flashhead.commands.patchsets", "maintainers' tools: check, new, table"),
    "bench": ("flashhead.commands.bench", "dense head vs FlashHead timing"),
    "convert": (
        "flashhead.commands.convert",
        "make a FlashHead model from a Hugging Face or GGUF model",
    ),
    "eval": ("flashhead.commands.eval", "FlashHead vs dense head agreement on real text"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashhead", description="FlashHead for vLLM")
    from flashhead import __version__

    parser.add_argument("--version", action="version", version=f"flashhead {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if wanted is not None and wanted in COMMANDS and name != wanted:
            sub.add_parser(name, help=help_text)
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
            p.set_defaults(func=_unavailable(name, exc))
            continue
        mod.add_parser(sub)
    return parser


def _unavailable(name: str, exc: Exception):
    def run(_args: argparse.Namespace) -> int:
        print(f"flashhead {name}: unavailable in this environment: {exc}", file=sys.stderr)
        return 2

    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
