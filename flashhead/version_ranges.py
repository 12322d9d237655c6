"""PEP 440 version ranges as intervals: the one range model behind patchset selection's
overlap/gap check (`registry.check_ranges`), the static check, the support table and
`patchsets new`, and the one way a range is printed (`spec_text`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from packaging.specifiers import Specifier, SpecifierSet
from packaging.version import InvalidVersion, Version


@dataclass(frozen=True)
class Bound:
    version: Version | None  # None = unbounded
    inclusive: bool


@dataclass(frozen=True)
class Interval:
    low: Bound
    high: Bound
    excluded: frozenset[Version] = frozenset()

    @property
    def empty(self) -> bool:
        lo, hi = self.low, self.high
        if lo.version is None or hi.version is None:
            return False
        if lo.version > hi.version:
            return True
        if lo.version == hi.version:
            if not (lo.inclusive and hi.inclusive):
                return True
            return lo.version in self.excluded
        return False

    def intersect(self, other: Interval) -> Interval:
        return Interval(
            _max_low(self.low, other.low),
            _min_high(self.high, other.high),
            self.excluded | other.excluded,
        )


def _max_low(a: Bound, b: Bound) -> Bound:
    if a.version is None:
        return b
    if b.version is None:
        return a
    if a.version != b.version:
        return a if a.version > b.version else b
    return Bound(a.version, a.inclusive and b.inclusive)


def _min_high(a: Bound, b: Bound) -> Bound:
    if a.version is None:
        return b
    if b.version is None:
        return a
    if a.version != b.version:
        return a if a.version < b.version else b
    return Bound(a.version, a.inclusive and b.inclusive)


def _next_release(release: Sequence[int], depth: int) -> Version:
    """The first release after the prefix release[:depth] (0.29 -> 0.30, 0.29.1 -> 0.29.2)."""
    parts = list(release[:depth])
    parts[-1] += 1
    return Version(".".join(str(p) for p in parts))


def _spec_interval(spec: Specifier) -> Interval:
    op, text = spec.operator, spec.version
    unbounded = Bound(None, False)
    if op == "==" and text.endswith(".*"):
        base = Version(text[:-2])
        return Interval(
            Bound(base, True), Bound(_next_release(base.release, len(base.release)), False)
        )
    if op == "~=":
        base = Version(text)
        depth = max(1, len(base.release) - 1)
        return Interval(Bound(base, True), Bound(_next_release(base.release, depth), False))
    if op == "!=":
        if text.endswith(".*"):  # a hole we do not model; it cannot create an overlap
            return Interval(unbounded, unbounded)
        return Interval(unbounded, unbounded, frozenset({Version(text)}))
    try:
        v = Version(text)
    except InvalidVersion:  # '===' arbitrary string: treat as unknown, never empty
        return Interval(unbounded, unbounded)
    if op in ("==", "==="):
        return Interval(Bound(v, True), Bound(v, True))
    if op == ">=":
        return Interval(Bound(v, True), unbounded)
    if op == ">":
        return Interval(Bound(v, False), unbounded)
    if op == "<=":
        return Interval(unbounded, Bound(v, True))
    if op == "<":
        return Interval(unbounded, Bound(v, False))
    return Interval(unbounded, unbounded)


def interval(specs: SpecifierSet) -> Interval:
    out = Interval(Bound(None, False), Bound(None, False))
    for spec in specs:
        out = out.intersect(_spec_interval(spec))
    return out


def bounds(specs: SpecifierSet) -> tuple[Version | None, Version | None]:
    """(lowest, highest) version the range names; None where it is open on that side."""
    iv = interval(specs)
    return iv.low.version, iv.high.version


def spec_text(spec: SpecifierSet) -> str:
    """A SpecifierSet as people write it: lower bound first (">=0.29,<0.34")."""
    return ",".join(
        str(s) for s in sorted(spec, key=lambda s: (s.operator.startswith("<"), s.version))
    )


def overlap_hint(iv: Interval) -> str:
    lo = iv.low.version
    hi = iv.high.version
    if lo is not None and hi is not None:
        return f": both match {'[' if iv.low.inclusive else '('}{lo}, {hi}{']' if iv.high.inclusive else ')'}"
    if lo is not None:
        return f": both match {lo} and later"
    if hi is not None:
        return f": both match versions before {hi}"
    return ": both match every version"
