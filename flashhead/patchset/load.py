"""Finding and loading patchset files (never raises for a bad file in a directory)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from flashhead.patchset.model import LoadResult, PatchSet, PatchsetError, Problem
from flashhead.patchset.validate import _Validator
from flashhead.settings import PATCHSET_DIR_ENV, settings


def default_patchset_dir() -> Path:
    """The patchsets shipped with the package (flashhead.patchsets)."""
    import flashhead.patchsets as shipped

    return Path(shipped.__file__).resolve().parent


def patchset_dir() -> Path:
    """``$FLASHHEAD_PATCHSET_DIR`` when set (tests, local overrides), else the shipped ones."""
    override = settings().patchset_dir
    return Path(override).expanduser() if override else default_patchset_dir()


def load_patchset(path: str | os.PathLike[str]) -> PatchSet:
    """Load and validate one file. Raises PatchsetError (with every problem) or OSError."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    return loads_patchset(text, path)


def loads_patchset(text: str, path: str | os.PathLike[str] = "<string>") -> PatchSet:
    path = Path(path)
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            what = " ".join(x for x in (exc.context, exc.problem) if x)
            raise PatchsetError(
                [
                    Problem(
                        str(path),
                        line,
                        "(yaml)",
                        f"syntax error: {what}",
                        "fix the YAML syntax (indentation, quoting, colons)",
                    )
                ]
            ) from None
        except yaml.YAMLError as exc:
            raise PatchsetError(
                [Problem(str(path), 1, "(yaml)", f"cannot parse: {exc}", "fix the YAML syntax")]
            ) from None
        if root is None:
            raise PatchsetError(
                [Problem(str(path), 1, "(file)", "empty patchset", "add schema, vllm and patches")]
            )
        validator = _Validator(path, loader)
        try:
            patchset = validator.patchset(root)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark
            line = mark.line + 1 if mark is not None else 1
            validator.problems.append(
                Problem(str(path), line, "(yaml)", str(exc.problem), "remove YAML tags")
            )
            patchset = None
        if validator.problems or patchset is None:
            raise PatchsetError(sorted(validator.problems, key=lambda p: p.line))
        return patchset
    finally:
        loader.dispose()


def load_patchsets(directory: str | os.PathLike[str] | None = None) -> LoadResult:
    """Every ``*.yaml`` in `directory` (default: :func:`patchset_dir`), sorted by file name.

    Never raises for bad files: their problems are returned so that the caller (plugin, doctor,
    checker) decides what to do.
    """
    root = Path(directory) if directory is not None else patchset_dir()
    result = LoadResult([], [])
    if not root.is_dir():
        result.problems.append(
            Problem(
                str(root),
                0,
                "(dir)",
                "patchset directory not found",
                f"check ${PATCHSET_DIR_ENV} or the install",
            )
        )
        return result
    for path in sorted(root.glob("*.yaml")):
        try:
            result.patchsets.append(load_patchset(path))
        except PatchsetError as exc:
            result.problems.extend(exc.problems)
            result.failed_files.append(path)
        except (OSError, UnicodeDecodeError) as exc:
            result.problems.append(
                Problem(str(path), 0, "(file)", f"cannot read: {exc}", "check the file")
            )
            result.failed_files.append(path)
    return result
