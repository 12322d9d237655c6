"""The one version-range model: intervals, bounds, how a range is printed."""

from __future__ import annotations

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from flashhead.version_ranges import bounds, interval, overlap_hint, spec_text


@pytest.mark.parametrize(
    "spec, low, high",
    [
        (">=0.29,<0.34", "0.29", "0.34"),
        ("==0.29.*", "0.29", "0.30"),
        ("~=0.29.1", "0.29.1", "0.30"),
        ("<0.11", None, "0.11"),
        (">0.31", "0.31", None),
    ],
)
def test_bounds_come_from_the_interval(spec, low, high):
    lo, hi = bounds(SpecifierSet(spec))
    assert (str(lo) if lo else None, str(hi) if hi else None) == (low, high)


def test_empty_ranges_and_the_overlap_hint():
    assert interval(SpecifierSet(">=0.30,<0.30")).empty
    assert interval(SpecifierSet("==0.31,!=0.31")).empty
    both = interval(SpecifierSet(">=0.29,<0.34")).intersect(interval(SpecifierSet(">=0.33")))
    assert not both.empty and overlap_hint(both) == ": both match [0.33, 0.34)"
    assert Version("0.33.1") > both.low.version


def test_spec_text_puts_the_lower_bound_first():
    assert spec_text(SpecifierSet("<0.34,>=0.29")) == ">=0.29,<0.34"
