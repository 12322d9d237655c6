"""Argument types shared by the subcommands, so a bad value reads the same everywhere."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_int_list(example: str) -> Callable[[str], list[int]]:
    """An argparse type for '1,8,32'-style lists of integers >= 1; `example` goes in the error."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers >= 1 such as {example}, got {text!r}"
            )
        return values

    return parse
