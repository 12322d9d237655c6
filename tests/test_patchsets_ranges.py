"""The shipped patchsets/ directory: every file validates, ranges neither overlap nor leave a gap
from 0.10.0 to the newest release, and the README's support table matches the YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.version import Version

from flashhead import registry, staticcheck, support_table

REPO = Path(__file__).resolve().parent.parent
PATCHSETS = REPO / "patchsets"


@pytest.fixture(scope="module")
def loaded() -> registry.LoadResult:
    return registry.load_patchsets(PATCHSETS)


def test_every_file_validates(loaded):
    assert loaded.problems == []
    names = {ps.name for ps in loaded.patchsets}
    assert names == {p.name for p in PATCHSETS.glob("*.yaml")}
    assert len(names) >= 2


def test_no_overlap_and_no_empty_range(loaded):
    assert registry.check_ranges(loaded.patchsets) == []


def test_no_gap_from_oldest_to_newest_release(loaded):
    assert (
        staticcheck.check_coverage(
            loaded.patchsets, support_table.OLDEST_RELEASE, support_table.NEWEST_RELEASE
        )
        == []
    )


@pytest.mark.parametrize("release", support_table.CI_RELEASES)
def test_each_ci_release_selects_exactly_one_file(loaded, release):
    matching = [ps.name for ps in loaded.patchsets if ps.matches(release)]
    assert len(matching) == 1, f"{release}: {matching}"


def test_ci_releases_cover_every_minor_in_order():
    versions = [Version(v) for v in support_table.CI_RELEASES]
    assert versions == sorted(versions)
    minors = sorted({(v.major, v.minor) for v in versions})
    assert minors == [(0, m) for m in range(10, minors[-1][1] + 1)]


def test_support_block_in_every_file_and_dense_files_say_why(loaded):
    for ps in loaded.patchsets:
        assert set(ps.support) == set(registry.SUPPORT_KEYS), ps.name
        if ps.serve == "dense":
            assert ps.reason.strip(), ps.name
            # A dense file only makes FlashHead models loadable: no handler patches.
            assert {p.kind for p in ps.patches} == {"register_architecture"}, ps.name
        else:
            assert any(p.kind == "register_oot" for p in ps.patches), ps.name


def test_below_0_10_2_logits_processor_cannot_be_replaced(loaded):
    # vLLM 0.10.0 - 0.10.1: LogitsProcessor is a plain nn.Module (no register_oot).
    ps = registry.select_patchset(loaded.patchsets, "0.10.1")
    assert ps is not None and ps.serve == "dense"
    assert "register_oot" in ps.reason


def test_model_runner_v2_absent_before_0_12(loaded):
    for release in ("0.10.0", "0.10.2", "0.11.2"):
        assert registry.select_patchset(loaded.patchsets, release).support["v2_runner"] == "absent"
    for release in support_table.CI_RELEASES:
        if Version(release) >= Version("0.12"):
            ps = registry.select_patchset(loaded.patchsets, release)
            assert ps.support["v2_runner"] != "absent", release


def test_readme_support_table_matches_the_yaml(loaded):
    """Regenerate with `flashhead patchsets table --write-readme README.md`."""
    results = support_table.load_results(PATCHSETS / "support.json")
    expected = support_table.render_markdown(support_table.build_rows(loaded.patchsets, results))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert support_table.readme_block(readme).strip() == expected.strip()
