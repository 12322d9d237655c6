"""Plain-text tables for the terminal: columns padded to their widest cell, two spaces apart."""

from __future__ import annotations

from collections.abc import Sequence


def pad_columns(rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """Every cell left-aligned to the widest cell of its column (rows may differ in length)."""
    widths: list[int] = []
    for row in rows:
        for i, cell in enumerate(row):
            if i == len(widths):
                widths.append(0)
            widths[i] = max(widths[i], len(cell))
    return [[cell.ljust(widths[i]) for i, cell in enumerate(row)] for row in rows]


def text_table(rows: Sequence[Sequence[str]], *, header: bool = True) -> list[str]:
    """The lines of a table; with ``header``, the first row is the header, ruled with dashes."""
    padded = pad_columns(rows)
    lines = ["  ".join(row).rstrip() for row in padded]
    if header and padded:
        lines.insert(1, "  ".join("-" * len(cell) for cell in padded[0]))
    return lines
