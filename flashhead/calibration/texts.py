"""Offline text families for sampling hidden states, all found on the machine itself.

Quality has to hold on any text, so `flashhead eval` reports one row per text family and convert
calibrates on several. Each family is split into two disjoint halves (by topic, by file or by
package) so that what a clustering is fitted on is never what it is evaluated on, and some families
are evaluation-only: convert never reads them, so they measure text unlike the calibration text.

| family | what | convert reads |
|---|---|---|
| prose | Python's pydoc topics (`pydoc_data`, part of the standard library) | calibration half |
| code | Python source of the standard library's top-level modules | calibration half |
| docstrings | docstrings of the standard library modules of the evaluation half | never |
| markdown | README texts of the installed Python packages (markdown long descriptions) | never |

The model's own text (chat answers, Q/A answers, free sampling) is made by `chat.py` and
`sampled.py`, not read from files.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

SPLITS = ("calibration", "evaluation")
TEXT_FAMILIES = ("prose", "code", "docstrings", "markdown")
# Families `flashhead convert` calibrates on; the others are evaluation-only.
CALIBRATION_TEXT_FAMILIES = ("prose", "code")

_CODE_CHUNK = 3000  # characters of each module's source: many modules, not a few long ones
_MARKDOWN_CHUNK = 1500  # characters of each package's README
_MIN_DOCSTRING = 80


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown text split {split!r} (use {' or '.join(SPLITS)})")


def stdlib_text(split: str) -> str:
    """The calibration or evaluation half of pydoc's topic texts (~230 kB each)."""
    _check_split(split)
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distro Pythons strip pydoc_data
        raise RuntimeError(
            "this Python has no pydoc_data (the default text); pass a text file with --text"
        ) from exc
    keys = sorted(topics)
    chosen = keys[0::2] if split == "calibration" else keys[1::2]
    return "\n\n".join(topics[k].strip() for k in chosen)


def _stdlib_modules(split: str) -> list[Path]:
    _check_split(split)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if len(files) < 20:
        raise RuntimeError(f"{root}: too few standard library modules for the code family")
    return files[0::2] if split == "calibration" else files[1::2]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def code_text(split: str) -> str:
    """A chunk from the middle of every standard library module of the split (past the license
    header and imports, where the code is)."""
    parts = []
    for path in _stdlib_modules(split):
        text = _read(path)
        start = text.find("\n", len(text) // 3) + 1
        parts.append(text[start : start + _CODE_CHUNK])
    return "\n\n".join(p for p in parts if p.strip())


def docstring_text(split: str) -> str:
    """The docstrings (modules, classes, functions) of the split's standard library modules."""
    parts = []
    for path in _stdlib_modules(split):
        try:
            tree = ast.parse(_read(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOCSTRING:
                    parts.append(doc)
    return "\n\n".join(parts)


def markdown_text(split: str = "evaluation") -> str:
    """README texts (markdown long descriptions) of the installed distributions, a chunk of each,
    in name order; every other package per split. flashhead's own README is left out."""
    import importlib.metadata as md

    _check_split(split)
    docs = []
    for dist in md.distributions():
        meta = dist.metadata
        name = (meta["Name"] or "").lower()
        kind = (meta.get("Description-Content-Type") or "").lower()
        body = meta.get("Description") or meta.get_payload() or ""
        if name and name != "flashhead" and "markdown" in kind and len(body) > 500:
            docs.append((name, body))
    docs = sorted(dict(docs).items())
    chosen = docs[0::2] if split == "calibration" else docs[1::2]
    if not chosen:
        raise RuntimeError(
            "no installed package has a markdown README (the markdown family); pass --text"
        )
    out = []
    for _, body in chosen:
        start = body.find("\n", len(body) // 4) + 1 if len(body) > 4 * _MARKDOWN_CHUNK else 0
        out.append(body[start : start + _MARKDOWN_CHUNK])
    return "\n\n".join(out)


def family_text(family: str, split: str) -> str:
    """The `split` half of a text family (see the module doc)."""
    readers = {
        "prose": stdlib_text,
        "code": code_text,
        "docstrings": docstring_text,
        "markdown": markdown_text,
    }
    if family not in readers:
        raise ValueError(f"unknown text family {family!r} (use {', '.join(TEXT_FAMILIES)})")
    return readers[family](split)


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
