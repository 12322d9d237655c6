"""`flashhead patchsets new`: a new release's patchset scaffolded from the previous file, with
every declared signature re-read from the release's source and each change marked for review."""

from __future__ import annotations

import json

from packaging.version import Version

from flashhead.patchset.model import PatchSet
from flashhead.source_tree import SourceTree
from flashhead.version_ranges import spec_text


def split_ranges(spec, version: Version) -> tuple[str, str | None]:
    """(new file's range, old file's narrowed range or None when it already ends before)."""
    from flashhead.version_ranges import bounds

    low, high = bounds(spec)
    start = f"{version.major}.{version.minor}" if version.micro == 0 else str(version)
    if high is not None and version < high:
        new_range = f">={start},<{high}"
        old_range = f">={low},<{start}" if low is not None else f"<{start}"
        return new_range, old_range
    return f">={start},<{version.major}.{version.minor + 1}", None


def scaffold_text(
    text: str, old: PatchSet, tree: SourceTree, version: str, new_range: str
) -> tuple[str, list[tuple[int, str]]]:
    """Return (new YAML text, [(line, note)]): `text` with the new range and every declared
    signature re-read from `tree`; changed / moved / missing ones get a `# ... in X:` comment."""
    import yaml

    from flashhead import staticcheck

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    lines = text.splitlines(keepends=True)
    edits: dict[int, tuple[int, int, str, str]] = {}  # line -> (col0, col1, new scalar, comment)
    marks: list[tuple[int, str]] = []

    def edit(node, new_value: str | None, comment: str) -> None:
        line = node.start_mark.line
        if node.end_mark.line != line:  # multi-line scalars: comment only
            new_value = None
        col0, col1 = node.start_mark.column, node.end_mark.column
        edits[line] = (
            col0,
            col1,
            json.dumps(new_value) if new_value is not None else None,
            comment,
        )
        marks.append((line + 1, comment))

    top = {k.value: v for k, v in root.value}
    edit(
        top["vllm"],
        new_range,
        f"scaffolded from {old.name} ({spec_text(old.vllm)}) for vLLM {version}",
    )
    marks.pop()  # the range line is not a review item
    for patch, pnode in zip(old.patches, top["patches"].value):
        fields = {k.value: v for k, v in pnode.value}
        for row in staticcheck.check_patch(patch, tree):
            if row.status == staticcheck.OK:
                continue
            node = site_node(fields, row.site)
            if node is None:
                continue
            if row.status == staticcheck.MOVED and row.site in ("target", "signature"):
                new_target = row.moved_to
                if patch.signature_of or row.target.endswith(".__init__"):
                    new_target = new_target.rsplit(".", 1)[0]
                edit(fields["target"], new_target, f"MOVED in {version}: was {patch.target}")
            elif row.status == staticcheck.MOVED and row.site.startswith("requires["):
                req = site_node(fields, row.site, want="target")
                edit(req, row.moved_to, f"MOVED in {version}: was {row.target}")
            if (
                row.found
                and row.expected
                and staticcheck.signature_differences(row.expected, row.found)
            ):
                if row.site != "target":
                    edit(node, row.found, f"CHANGED in {version}: was {row.expected}")
            elif row.status not in (staticcheck.MOVED, staticcheck.CHANGED):
                edit(node, None, f"{row.status.upper()} in {version}: {row.target}: {row.detail}")
    out = []
    for i, line in enumerate(lines):
        if i not in edits:
            out.append(line)
            continue
        col0, col1, scalar, comment = edits[i]
        body = line.rstrip("\n")
        if scalar is not None:
            body = body[:col0] + scalar + body[col1:]
        out.append(f"{body}  # {comment}\n")
    return "".join(out), marks


def site_node(fields: dict, site: str, want: str = "signature"):
    """The YAML scalar node a check row refers to (see TargetResult.site)."""
    if site.startswith("architectures."):
        arch = fields.get("architectures")
        name = site.split(".", 1)[1]
        for key, value in getattr(arch, "value", []):
            if key.value == name:
                return value
        return None
    if site.startswith("requires["):
        index = int(site[len("requires[") : -1])
        reqs = getattr(fields.get("requires"), "value", [])
        if index >= len(reqs):
            return None
        rfields = {k.value: v for k, v in reqs[index].value}
        return rfields.get(want) or rfields.get("target")
    if site == "kind":
        return fields.get("kind")
    return fields.get(site) or fields.get("target")
