"""Choosing the patchset for a vLLM release, and checking that the files' ranges are
disjoint and non-empty."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from packaging.version import Version

from flashhead.patchset.model import PatchSet
from flashhead.version_ranges import interval, overlap_hint


def select_patchset(patchsets: Iterable[PatchSet], version: Version | str) -> PatchSet | None:
    """The patchset whose range contains `version` (the release used for matching), or None.

    With overlapping ranges (a checker error) the first by file name wins, deterministically.
    """
    v = version if isinstance(version, Version) else Version(str(version))
    for ps in sorted(patchsets, key=lambda p: p.name):
        if ps.matches(v):
            return ps
    return None


def check_ranges(patchsets: Sequence[PatchSet]) -> list[str]:
    """Problems with the version ranges of a collection of patchsets: empty or overlapping.

    Each problem is ``file:line: vllm: ...`` so the checker can print it as is.
    """
    problems: list[str] = []
    intervals = [(ps, interval(ps.vllm)) for ps in sorted(patchsets, key=lambda p: p.name)]
    for ps, iv in intervals:
        if iv.empty:
            problems.append(
                f"{ps.path}:{ps.vllm_line}: vllm: range {ps.range_text!r} matches no version (fix the bounds)"
            )
    for i, (a, ia) in enumerate(intervals):
        for b, ib in intervals[i + 1 :]:
            if ia.empty or ib.empty:
                continue
            both = ia.intersect(ib)
            if not both.empty:
                problems.append(
                    f"{b.path}:{b.vllm_line}: vllm: range {b.range_text!r} overlaps {a.name} "
                    f"({a.range_text!r}, line {a.vllm_line}){overlap_hint(both)} "
                    "(every vLLM version must select at most one file; move a bound)"
                )
    return problems
