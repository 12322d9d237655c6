"""The support table: vLLM release x {patchset, static check, run-time check, V1 runner, V2 runner,
spec decode}.

Static facts come from each patchset's `support` block (and `serve: dense`); check results come
from a results file that CI writes (`scripts/static_check_all.sh` -> `patchsets/support.json`).
The README carries the Markdown rendering between two markers; a test keeps them in step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, replace
from pathlib import Path

from packaging.version import Version

from flashhead.patchset.schema import SUPPORT_KEYS

# One release per minor, 0.10 -> newest (the release the reference tables use), plus 0.10.0 for
# the pre-CustomOp range. CI checks exactly these; add the next release here when it ships.
CI_RELEASES: tuple[str, ...] = (
    "0.10.0",
    "0.10.2",
    "0.11.2",
    "0.12.0",
    "0.13.0",
    "0.14.1",
    "0.15.1",
    "0.16.0",
    "0.17.1",
    "0.18.1",
    "0.19.1",
    "0.20.2",
    "0.21.0",
    "0.22.1",
    "0.23.0",
    "0.24.0",
    "0.25.1",
    "0.26.0",
    "0.27.1",
    "0.28.0",
    "0.29.0",
    "0.30.0",
    "0.31.0",
    "0.32.0",
    "0.33.0",
)
OLDEST_RELEASE = "0.10.0"
NEWEST_RELEASE = CI_RELEASES[-1]

RESULTS_SCHEMA = 1
README_START = "<!-- support-table:start -->"
README_END = "<!-- support-table:end -->"
COLUMNS = (
    "vLLM",
    "patchset",
    "static check",
    "run-time check",
    "V1 runner",
    "V2 runner",
    "spec decode",
    "tensor parallel",
    "pipeline parallel",
)


# What the handlers do where a patchset leaves a key out (the other keys only describe).
UNSET_MEANS = {"tensor_parallel": "dense", "pipeline_parallel": "dense"}


# What make_vllm_env.sh says when a release's native kernels die of SIGILL on this CPU (a
# wheel built for AVX-512 only, on a machine without it). That is the CI host's CPU, not the
# release: the README keeps the result a host with those instructions measured.
CPU_LIMITED = "not installable: its native kernels need instructions this CPU lacks"


class SupportTableError(ValueError):
    """A results file or README block is malformed."""


@dataclass(frozen=True)
class Row:
    release: str
    patchset: str
    static_check: str
    runtime_check: str
    v1_runner: str
    v2_runner: str
    spec_decode: str
    tensor_parallel: str
    pipeline_parallel: str

    def cells(self) -> list[str]:
        """The row in COLUMNS order (the fields are declared in that order)."""
        return list(astuple(self))


def default_results_path() -> Path:
    from flashhead.registry import patchset_dir

    return patchset_dir() / "support.json"


def load_results(path: Path | None) -> dict:
    """`{"schema": 1, "releases": {version: {"static_check": ..., "runtime_check": ...}}}`; an
    absent file means nothing has been checked yet."""
    if path is None or not Path(path).is_file():
        return {"schema": RESULTS_SCHEMA, "releases": {}}
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise SupportTableError(
            f"{path}: not valid JSON ({exc}); regenerate it with scripts/static_check_all.sh"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("releases"), dict):
        raise SupportTableError(
            f'{path}: expected {{"schema": 1, "releases": {{...}}}}; regenerate it with '
            "scripts/static_check_all.sh"
        )
    return data


def write_results(path: Path, releases: Mapping[str, Mapping]) -> None:
    """Write the results file with releases in version order (stable diffs)."""
    ordered = {v: dict(releases[v]) for v in sorted(releases, key=Version)}
    # Atomic: tests read this file while CI rewrites it.
    tmp = Path(f"{path}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"schema": RESULTS_SCHEMA, "releases": ordered}, indent=1) + "\n")
    os.replace(tmp, path)


def table_releases(results: Mapping) -> list[str]:
    """CI_RELEASES, plus every release the results hold a run-time check for: the run-time matrix
    runs the newest release of a family that loads here, which is not always the one the static
    check reads (0.11.1.post2 runs; 0.11.2's native code does not load on this machine)."""
    checked = results.get("releases", {})
    extra = {r for r, res in checked.items() if "runtime_check" in res}
    return sorted(set(CI_RELEASES) | extra, key=Version)


def build_rows(
    patchsets: Sequence, results: Mapping, releases: Sequence[str] | None = None
) -> list[Row]:
    """One row per release: `releases`, or by default `table_releases(results)`."""
    from flashhead.registry import select_patchset

    checked = results.get("releases", {})
    if releases is None:
        releases = table_releases(results)
    rows = []
    for release in releases:
        ps = select_patchset(patchsets, release)
        res = checked.get(release, {})
        static = res.get("static_check", "not run")
        runtime = res.get("runtime_check", "not run")
        if ps is None:
            rows.append(Row(release, "none", static, runtime, *["-"] * len(SUPPORT_KEYS)))
            continue
        if ps.serve == "dense":
            support = {k: "dense" for k in SUPPORT_KEYS}
            support.update({k: v for k, v in ps.support.items() if v == "absent"})
        else:
            support = dict(ps.support)
        cells = (support.get(k, UNSET_MEANS.get(k, "?")) for k in SUPPORT_KEYS)
        rows.append(Row(release, ps.name, static, runtime, *cells))
    return rows


def render_markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(row.cells()) + " |")
    legend = (
        "\n`flashhead`: served with FlashHead; `dense`: the stock dense head runs (FlashHead "
        "models still load); `absent`: that runner does not exist in the release. Static check: "
        "`flashhead patchsets check --vllm-version X` against the release's source; run-time "
        "check: `ok` = the patch engine against the installed release (`flashhead doctor`) and "
        "the full e2e suite; `ok (serves ...)` = the release smoke of `scripts/matrix.sh` "
        "(real `vllm serve`: every process, doctor, all probes equal dense, one probe differs, "
        "seeded repeats, plain models untouched, refused without the plugin); `not "
        "installable: ...` = CI tried the release and says why it cannot run on its machine; "
        "`not run`: not run by CI yet."
    )
    return "\n".join(lines) + "\n" + legend + "\n"


def keep_readme_where_cpu_limited(rows: Sequence[Row], block: str) -> tuple[list[Row], list[str]]:
    """`rows` with the README block's run-time cell wherever this run could not load a
    release's kernels on its CPU (CPU_LIMITED), and one note per such release."""
    readme_cells = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COLUMNS):
            readme_cells[cells[0]] = cells[COLUMNS.index("run-time check")]
    kept, notes = [], []
    for row in rows:
        before = readme_cells.get(row.release)
        if row.runtime_check.startswith(CPU_LIMITED) and before is not None:
            notes.append(f"{row.release}: {row.runtime_check}; the README keeps '{before}'")
            row = replace(row, runtime_check=before)
        kept.append(row)
    return kept, notes


def render_text(rows: Sequence[Row]) -> str:
    from flashhead.text_table import text_table

    return "\n".join(text_table([list(COLUMNS)] + [r.cells() for r in rows])) + "\n"


def readme_block(text: str, path: str = "README.md") -> str:
    """The text between the support-table markers."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SupportTableError(
            f"{path}: no support-table block; add the lines {README_START} and {README_END} "
            "where the table goes"
        )
    return text[start + len(README_START) : end].strip("\n") + "\n"


def replace_readme_block(text: str, table: str, path: str = "README.md") -> str:
    readme_block(text, path)  # validates the markers
    start = text.find(README_START) + len(README_START)
    end = text.find(README_END)
    return text[:start] + "\n" + table.rstrip("\n") + "\n" + text[end:]
