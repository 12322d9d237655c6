"""Check patchsets against a vLLM *source tree* with `ast` only: vLLM is never imported.

- `SourceTree` (`flashhead.source_tree`): an index of `vllm/**/*.py`.
- `check_patchset`: for each patch, compare the declared `signature` / `signature_of` / `requires`
  with what the tree defines; `register_architecture` base names must be in the model registry
  table, `register_oot` targets must have a `register_oot` classmethod (directly or inherited).

Statuses per checked target: ok, moved (not at the declared place, found elsewhere under the same
qualified tail), signature changed, missing.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from packaging.version import Version

from flashhead.source_tree import (  # noqa: F401  (SourceTree* are part of this API)
    REGISTRY_MODULE,
    Definition,
    SourceTree,
    SourceTreeError,
    follow_alias,
)
from flashhead.version_ranges import bounds

if TYPE_CHECKING:
    from flashhead.registry import PatchSet, PatchSpec

# ---- checking patchsets ------------------------------------------------------------------------
OK, MOVED, CHANGED, MISSING = "ok", "moved", "signature changed", "missing"
# In triage (a release no patchset covers) "ok" reads better as "unchanged".
_TRIAGE_WORDS = {OK: "unchanged"}


@dataclass
class TargetResult:
    """One checked symbol: a patch's target, its `signature_of` member, or a `requires` entry."""

    patch_id: str
    target: str
    status: str
    expected: str = ""  # the declared signature ("" when none is declared)
    found: str = ""  # the signature in the tree ("" when not found / not a function)
    location: str = ""  # where the tree defines it, when that is not `target` itself
    detail: str = ""  # what differs, or why it is missing
    required: bool = True
    # The YAML field the row checks: "target", "signature", "architectures.<Base>" or
    # "requires[i]" (`patchsets new` edits that field).
    site: str = "target"
    moved_to: str = ""  # for "moved": the target spelled at its new place

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


def check_patchset(patchset: PatchSet, tree: SourceTree) -> list[TargetResult]:
    """Check every patch of a loaded `flashhead.registry.PatchSet` against `tree`."""
    rows: list[TargetResult] = []
    for patch in patchset.patches:
        rows.extend(check_patch(patch, tree))
    return rows


def check_patch(patch: PatchSpec, tree: SourceTree) -> list[TargetResult]:
    """Rows for one `flashhead.registry.PatchSpec`: its target (or `signature_of` member), then
    kind-specific checks, then each `requires` entry."""
    pid, required = patch.id, patch.required
    rows: list[TargetResult] = []
    if patch.kind == "register_architecture":
        rows.append(_check_target(pid, patch.target, None, tree, required))
        rows.extend(_check_architectures(patch, tree))
    elif patch.kind == "register_oot":
        rows.append(_check_target(pid, patch.target, None, tree, required))
        if rows[-1].status in (OK, MOVED):
            rows.append(_check_register_oot(pid, patch.target, rows[-1], tree, required))
        if patch.signature_of or patch.signature:
            member = f"{patch.target}.{patch.signature_of or '__init__'}"
            rows.append(_check_target(pid, member, patch.signature, tree, required))
            rows[-1].site = "signature"
    else:
        target = f"{patch.target}.{patch.signature_of}" if patch.signature_of else patch.target
        rows.append(_check_target(pid, target, patch.signature, tree, required))
        rows[-1].site = "signature" if patch.signature else "target"
    for i, req in enumerate(getattr(patch, "requires", ()) or ()):
        rows.append(_check_target(pid, req.target, req.signature, tree, required))
        rows[-1].site = f"requires[{i}]"
    return rows


def signature_of(defn: Definition, tree: SourceTree) -> str:
    """The rendered parameter list of a function / method / property getter, or of a class's
    `__init__` (inherited ones included); "" for anything else."""
    from flashhead.signatures import from_ast

    defn = follow_alias(defn, tree)
    if defn.kind == "class":
        init = tree.resolve(f"{defn.location}.__init__")
        return signature_of(init, tree) if init is not None else ""
    if isinstance(defn.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return from_ast(defn.node).render()
    return ""


def _check_target(
    pid: str, target: str, declared: str | None, tree: SourceTree, required: bool
) -> TargetResult:
    row = TargetResult(pid, target, OK, expected=declared or "", required=required)
    found = tree.resolve(target)
    if found is None:
        module, _, qual = target.partition(":")
        elsewhere = [(t, d) for t, d in tree.find_by_tail(qual) if t != target]
        if not elsewhere:
            row.status = MISSING
            row.detail = _why_missing(module, qual, tree)
            return row
        row.moved_to, found = elsewhere[0]
        row.status = MOVED
        others = ", ".join(t for t, _d in elsewhere)
        row.detail = f"not at {target}; defined at {others}"
    if found.inherited_from or found.location != target:
        row.location = found.location
    if found.kind == "attribute":
        # Set only on instances: the live check (flashhead.engine) sees class-level names,
        # dataclass fields and annotations only, so this target would fail at run time.
        parts = found.qualname.rsplit(".", 1)
        owner, name = parts[0], parts[-1]
        row.status = MISSING
        row.detail = _join(
            row.detail,
            f"{name} is only assigned on instances (self.{name} = ... in {owner}"
            f", line {found.lineno}); require a class-level name, a dataclass field or an "
            "annotated attribute instead",
        )
        return row
    row.found = signature_of(found, tree)
    if declared is None:
        return row
    if not row.found:
        row.status = CHANGED if row.status == OK else row.status
        row.detail = _join(row.detail, f"{found.location} is a {found.kind}, not a function")
        return row
    diffs = signature_differences(declared, row.found)
    if diffs:
        if row.status == OK:
            row.status = CHANGED
        row.detail = _join(row.detail, "; ".join(diffs))
    return row


def signature_differences(declared: str, found: str) -> list[str]:
    """What differs between a declared and a found signature, in the static check's words."""
    from flashhead.signatures import compare, parse_signature

    return [
        d.replace("live", "found")
        for d in compare(parse_signature(declared), parse_signature(found))
    ]


def _why_missing(module: str, qual: str, tree: SourceTree) -> str:
    if not tree.has_module(module):
        return f"module {module} does not exist in this release"
    parts = qual.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = tree.resolve(f"{module}:{'.'.join(parts[:i])}")
        if owner is not None:
            bases = ", ".join(tree.bases(owner)) or "none"
            return (
                f"{owner.location} has no {'.'.join(parts[i:])} "
                f"(bases: {bases}), and no class in the tree defines {qual}"
            )
    return f"{module} defines no {parts[0]}, and no module in the tree defines {qual}"


def _check_register_oot(
    pid: str, target: str, target_row: TargetResult, tree: SourceTree, required: bool
) -> TargetResult:
    cls = tree.resolve(target_row.location or target)
    name = f"{target}.register_oot"
    row = TargetResult(pid, name, OK, required=required, site="kind")
    if cls is None or cls.kind != "class":
        row.status, row.detail = MISSING, f"{target} is not a class"
        return row
    hook = tree.resolve(f"{cls.location}.register_oot")
    if hook is None:
        bases = ", ".join(tree.bases(cls)) or "none"
        row.status = MISSING
        row.detail = (
            f"{cls.location} has no register_oot (bases: {bases}): out-of-tree replacement "
            "needs a CustomOp / PluggableLayer subclass"
        )
        return row
    row.location = hook.location
    row.found = signature_of(hook, tree)
    return row


def _check_architectures(patch, tree: SourceTree) -> list[TargetResult]:
    known = tree.registry_architectures()
    rows = []
    for new, base in patch.architectures.items():
        row = TargetResult(patch.id, f"{patch.target}[{base}]", OK, required=patch.required)
        row.expected = f"{base} (for {new})"
        row.site = f"architectures.{new}"
        if known is None:
            row.status, row.detail = MISSING, f"{REGISTRY_MODULE} does not exist in this release"
        elif base not in known:
            row.status = MISSING
            row.detail = f"base architecture {base} (for {new}) is not in vLLM's model registry"
        rows.append(row)
    return rows


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def triage_word(status: str) -> str:
    return _TRIAGE_WORDS.get(status, status)


# ---- release-level helpers ---------------------------------------------------------------------
def tree_version(tree: SourceTree) -> str | None:
    """The release a source tree is from: the fetch marker, else `vllm/_version.py` /
    `vllm/version.py` (`__version__ = "..."`), else None."""
    from flashhead.sdist import source_info

    info = source_info(tree.root)
    if info.get("version"):
        return str(info["version"])
    for module in ("vllm._version", "vllm.version"):
        mod = tree._module(module)
        if mod is None:
            continue
        for name in ("__version__", "version"):
            node = mod.defs.get(name)
            value = getattr(node, "value", None)
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
    return None


def nearest_patchset(patchsets: Sequence[PatchSet], version: str) -> PatchSet | None:
    """The patchset whose range is closest to `version` (for triage of an uncovered release)."""
    v = Version(version)

    def distance(ps: PatchSet) -> tuple[float, str]:
        low, high = bounds(ps.vllm)
        if ps.matches(v):
            return 0.0, ps.name
        if high is not None and v >= high:
            return _release_number(v) - _release_number(high), ps.name
        if low is not None and v < low:
            return _release_number(low) - _release_number(v), ps.name
        return float("inf"), ps.name

    return min(patchsets, key=distance) if patchsets else None


def _release_number(v: Version) -> float:
    parts = (list(v.release) + [0, 0, 0])[:3]
    return parts[0] * 1e6 + parts[1] * 1e3 + parts[2]


def check_coverage(patchsets: Sequence[PatchSet], first: str, last: str) -> list[str]:
    """Versions in [first, last] that no patchset selects. Coverage only changes at the bounds
    the files name, so probing each bound and a point just above it finds every gap."""
    lo, hi = Version(first), Version(last)
    probes = {lo, hi}
    for ps in patchsets:
        for s in ps.vllm:
            try:
                b = Version(s.version.rstrip(".*"))
            except ValueError:
                continue
            probes.add(b)
    # Just above each probe: append a tiny release segment (0.26 -> 0.26.0.0.1).
    probes |= {
        Version(".".join(map(str, (list(p.release) + [0, 0, 0])[:3] + [0, 1]))) for p in probes
    }
    # Merge consecutive uncovered probes into [start, next covered probe) segments.
    segments: list[tuple[Version, Version | None]] = []
    start = None
    for p in sorted(x for x in probes if lo <= x <= hi):
        covered = any(ps.matches(p) for ps in patchsets)
        if not covered and start is None:
            start = p
        elif covered and start is not None:
            segments.append((start, p))
            start = None
    if start is not None:
        segments.append((start, None))
    if not segments:
        return []
    text = ", ".join(
        f">={_tidy(a)},<{_tidy(b)}" if b is not None else f">={_tidy(a)},<={last}"
        for a, b in segments
    )
    return [
        f"no patchset selects vLLM {text} (ranges must leave no gap from {first} to {last}: "
        "move a bound so that the files meet, or add a file for the gap)"
    ]


def _tidy(v: Version) -> str:
    rel = v.release
    if len(rel) == 5 and rel[3:] == (0, 1):  # a probe just above a bound
        return f"{'.'.join(map(str, rel[:3]))}+"
    return str(v)
