"""Offline text for sampling hidden states: Python's own documentation prose (`pydoc_data`, part
of the standard library), split by topic into two disjoint halves so that the text a clustering
is fitted on is never the text it is evaluated on."""

from __future__ import annotations

from pathlib import Path

SPLITS = ("calibration", "evaluation")


def stdlib_text(split: str) -> str:
    """The calibration or evaluation half of pydoc's topic texts (~230 kB each)."""
    if split not in SPLITS:
        raise ValueError(f"unknown text split {split!r} (use {' or '.join(SPLITS)})")
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distro Pythons strip pydoc_data
        raise RuntimeError(
            "this Python has no pydoc_data (the default text); pass a text file with --text"
        ) from exc
    keys = sorted(topics)
    chosen = keys[0::2] if split == "calibration" else keys[1::2]
    return "\n\n".join(topics[k].strip() for k in chosen)


def read_text(path: str | Path | None, split: str) -> str:
    """A user's UTF-8 text file, or the default stdlib text for `split`."""
    if path is None:
        return stdlib_text(split)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: cannot read the text ({exc}). Fix: pass a UTF-8 text file") from exc
    if len(text.strip()) < 100:
        raise ValueError(f"{p}: only {len(text.strip())} characters. Fix: pass a longer text")
    return text
