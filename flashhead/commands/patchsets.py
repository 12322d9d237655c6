"""`flashhead patchsets`: maintainers' tools.

- `check`: compare the patchset for a vLLM release with that release's source (ast only; the
  source is fetched from the release's sdist), then check that the version ranges of all files
  neither overlap nor leave a gap. A release no file covers is triaged against the nearest file.
- `new`: scaffold the next range from an existing file, re-reading every signature from the new
  release and marking each change with a YAML comment.
- `table`: the support table (release x patchset / checks / runners / spec decode).
- `schema`: the JSON schema of a patchset file (``patchsets/schema.json``, for editors).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from packaging.version import InvalidVersion, Version

from flashhead.version_ranges import spec_text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "patchsets",
        help="maintainers' tools: check, new, table, schema",
        description="Maintainers' tools for the patchset YAML files.",
    )
    sub = parser.add_subparsers(dest="patchsets_command", metavar="ACTION")
    parser.set_defaults(func=lambda _args: _usage(parser))

    check = sub.add_parser(
        "check",
        help="check a patchset against a vLLM release's source (no vLLM import)",
        description="Check the patchset that covers a vLLM release against that release's "
        "source code, then check the version ranges of all patchset files. Exit status 1 on "
        "any mismatch, 2 on bad input.",
    )
    check.add_argument(
        "--vllm-source",
        metavar="DIR",
        help="a vLLM source tree (contains vllm/); its release is read from the tree unless "
        "--vllm-version is given too",
    )
    check.add_argument(
        "--vllm-version", metavar="X", help="fetch release X's sdist (cached) and check it"
    )
    check.add_argument("--patchset", metavar="FILE", help="check this file (default: the match)")
    _add_dir_option(check)
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(func=run_check)

    new = sub.add_parser(
        "new",
        help="scaffold the next version range from an existing patchset",
        description="Copy FILE, set the range for release X, re-read every declared signature "
        "from X's source and mark each one that changed. The old file is not edited: the "
        "command prints how to narrow its range.",
    )
    new.add_argument("--from", dest="from_file", required=True, metavar="FILE")
    new.add_argument("--vllm", required=True, metavar="X", help="the new release, e.g. 0.34.0")
    new.add_argument("--out", metavar="FILE", help="default: vllm-X.Y.yaml next to FILE")
    new.add_argument("--vllm-source", metavar="DIR", help="use this source tree for release X")
    new.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    new.set_defaults(func=run_new)

    table = sub.add_parser(
        "table",
        help="the support table (release x patchset, checks, runners, spec decode, TP, PP)",
        description="Release x {patchset, static check, run-time check, V1 runner, V2 runner, "
        "spec decode, tensor parallel, pipeline parallel} from the patchsets' support blocks "
        "and the CI results file.",
    )
    table.add_argument("--markdown", action="store_true", help="Markdown (as in the README)")
    table.add_argument("--results", metavar="FILE", help="default: support.json in the dir")
    _add_dir_option(table)
    readme = table.add_mutually_exclusive_group()
    readme.add_argument("--write-readme", metavar="README", help="replace the README's block")
    readme.add_argument(
        "--check-readme", metavar="README", help="exit 1 when the README's block is stale"
    )
    table.set_defaults(func=run_table)

    schema = sub.add_parser(
        "schema",
        help="the JSON schema of a patchset file (patchsets/schema.json)",
        description="Print the JSON schema of a patchset file, generated from the pydantic "
        "models that validate it. Editors with a YAML language server complete and check the "
        "files with it.",
    )
    written = schema.add_mutually_exclusive_group()
    written.add_argument("--write", metavar="FILE", help="write it to FILE")
    written.add_argument("--check", metavar="FILE", help="exit 1 when FILE is not up to date")
    schema.set_defaults(func=run_schema)


def _add_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--patchset-dir",
        metavar="DIR",
        help="directory of patchset files (default: $FLASHHEAD_PATCHSET_DIR or the shipped ones)",
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _fail(message: str) -> int:
    print(f"flashhead patchsets: {message}", file=sys.stderr)
    return 2


# ---- check -----------------------------------------------------------------------------------
def run_check(args: argparse.Namespace) -> int:
    from flashhead import registry, staticcheck
    from flashhead.support_table import NEWEST_RELEASE, OLDEST_RELEASE

    if not args.vllm_source and not args.vllm_version:
        return _fail("check: pass --vllm-version X (fetches the release) or --vllm-source DIR")
    try:
        tree, version = _source_tree(args.vllm_source, args.vllm_version)
    except (staticcheck.SourceTreeError, _InputError) as exc:
        return _fail(str(exc))
    if version is None and not args.patchset:
        return _fail(
            f"cannot tell which vLLM release {tree.root} is (no vllm/_version.py); pass "
            "--vllm-version X too, or --patchset FILE"
        )

    loaded = registry.load_patchsets(args.patchset_dir)
    if loaded.problems:
        for p in loaded.problems:
            print(p, file=sys.stderr)
        return _fail("fix the patchset files above first")
    patchsets = loaded.patchsets

    triage = False
    if args.patchset:
        try:
            chosen = registry.load_patchset(args.patchset)
        except registry.PatchsetError as exc:
            print(exc, file=sys.stderr)
            return _fail(f"{args.patchset} is not a valid patchset")
        except OSError as exc:
            return _fail(f"{args.patchset}: cannot read ({exc.strerror}); check the path")
    else:
        chosen = registry.select_patchset(patchsets, version) if version else None
        if chosen is None:
            triage = True
            chosen = staticcheck.nearest_patchset(patchsets, version or NEWEST_RELEASE)
            if chosen is None:
                return _fail("no patchset files found; check --patchset-dir")

    rows = staticcheck.check_patchset(chosen, tree)
    ranges = registry.check_ranges(patchsets)
    # Coverage is checked over the known releases; a newer one is the triage case above.
    ranges += staticcheck.check_coverage(patchsets, OLDEST_RELEASE, NEWEST_RELEASE)
    ok = all(r.ok for r in rows) and not ranges and not triage

    if args.json:
        print(
            json.dumps(
                {
                    "vllm_version": version,
                    "source": str(tree.root),
                    "patchset": str(chosen.path),
                    "patchset_range": spec_text(chosen.vllm),
                    "triage": triage,
                    "ok": ok,
                    "mismatches": sum(not r.ok for r in rows),
                    "rows": [r.to_json() for r in rows],
                    "range_problems": ranges,
                },
                indent=1,
            )
        )
        return 0 if ok else 1

    print(f"vLLM {version or '(unknown version)'} source: {tree.root}")
    if triage:
        print(
            f"TRIAGE: no patchset covers vLLM {version}; nearest is {chosen.name} "
            f"({spec_text(chosen.vllm)}). Each of its targets in {version}:"
        )
    else:
        print(f"patchset: {chosen.path} ({spec_text(chosen.vllm)}, serve: {chosen.serve})")
    print(_render_rows(rows, triage))
    bad = [r for r in rows if not r.ok]
    for r in bad:
        print(f"MISMATCH {r.patch_id}: {r.target}: {r.status}: {r.detail or 'see table'}")
        if r.expected or r.found:
            print(f"  expected: {r.expected or '-'}")
            print(f"  found:    {r.found or '-'}" + (f"  at {r.location}" if r.location else ""))
    for problem in ranges:
        print(f"RANGES {problem}")
    if triage:
        print(
            f"next: flashhead patchsets new --from {chosen.path} --vllm {version}  "
            "(scaffolds the new range with every changed signature marked)"
        )
    summary = "OK" if ok else f"FAILED: {len(bad)} mismatch(es), {len(ranges)} range problem(s)"
    print(summary)
    return 0 if ok else 1


def _render_rows(rows, triage: bool) -> str:
    from flashhead.staticcheck import triage_word

    table = [["patch", "target", "status", "expected", "found"]]
    for r in rows:
        found = r.found
        if r.location:
            found = f"{found} @ {r.location}" if found else f"@ {r.location}"
        status = triage_word(r.status) if triage else r.status
        table.append([r.patch_id, r.target, status, r.expected or "-", found or "-"])
    from flashhead.text_table import pad_columns

    heads = ["  ".join(cells) for cells in pad_columns([row[:3] for row in table])]
    lines = [f"{heads[0]}  expected  ->  found"]
    lines += [f"{head}  {row[3]}  ->  {row[4]}" for head, row in zip(heads[1:], table[1:])]
    return "\n".join(lines)


class _InputError(ValueError):
    pass


def _source_tree(source: str | None, version: str | None):
    from flashhead import sdist, staticcheck

    if source:
        tree = staticcheck.SourceTree(source)
        return tree, _checked_version(version) if version else staticcheck.tree_version(tree)
    version = _checked_version(version)
    try:
        path = sdist.fetch_source(version)
    except sdist.SdistError as exc:
        raise _InputError(str(exc)) from exc
    return staticcheck.SourceTree(path), version


def _checked_version(text: str) -> str:
    try:
        return str(Version(text))
    except InvalidVersion:
        raise _InputError(f"--vllm-version {text!r} is not a version (write e.g. 0.32.0)") from None


# ---- new -------------------------------------------------------------------------------------
def run_new(args: argparse.Namespace) -> int:
    from flashhead import registry, staticcheck
    from flashhead.patchset.scaffold import scaffold_text, split_ranges

    src = Path(args.from_file)
    try:
        old = registry.load_patchset(src)
        text = src.read_text(encoding="utf-8")
    except registry.PatchsetError as exc:
        print(exc, file=sys.stderr)
        return _fail(f"{src} is not a valid patchset; fix it before scaffolding from it")
    except OSError as exc:
        return _fail(f"{src}: cannot read ({exc.strerror}); check the path")
    try:
        version = Version(_checked_version(args.vllm))
        tree, _ = _source_tree(args.vllm_source, str(version))
    except (staticcheck.SourceTreeError, _InputError) as exc:
        return _fail(str(exc))

    new_range, old_range = split_ranges(old.vllm, version)
    out = (
        Path(args.out) if args.out else src.with_name(f"vllm-{version.major}.{version.minor}.yaml")
    )
    if out.exists() and not args.force and out.resolve() != src.resolve():
        return _fail(f"{out} exists; pass --out FILE or --force")
    if out.resolve() == src.resolve():
        return _fail(f"--out {out} is the source file; the old file is never edited in place")

    scaffold, marks = scaffold_text(text, old, tree, str(version), new_range)
    out.write_text(scaffold, encoding="utf-8")
    try:
        registry.load_patchset(out)
    except registry.PatchsetError as exc:  # pragma: no cover - would be a bug in scaffold_text
        print(exc, file=sys.stderr)
        return _fail(f"{out}: the scaffold does not validate (a bug; please report it)")

    print(f"wrote {out} for vLLM {new_range} ({len(marks)} marked line(s))")
    for line, note in marks:
        print(f"  {out}:{line}: {note}")
    print("next steps:")
    if old_range is not None:
        print(
            f'  1. narrow {src}: line {old.vllm_line}: vllm: "{spec_text(old.vllm)}" -> vllm: "{old_range}"'
            " (this command does not edit it)"
        )
    else:
        print(
            f"  1. {src} ({spec_text(old.vllm)}) already ends before {version}; leave it as it is"
        )
    print(f"  2. review each marked line in {out}, update handlers, then delete the marks")
    where = f"--vllm-source {args.vllm_source}" if args.vllm_source else f"--vllm-version {version}"
    print(f"  3. flashhead patchsets check {where} --patchset {out}")
    return 0


# ---- table -----------------------------------------------------------------------------------
def run_table(args: argparse.Namespace) -> int:
    from flashhead import registry, support_table

    loaded = registry.load_patchsets(args.patchset_dir)
    if loaded.problems:
        for p in loaded.problems:
            print(p, file=sys.stderr)
        return _fail("fix the patchset files above first")
    results_path = Path(args.results) if args.results else None
    if results_path is None:
        base = Path(args.patchset_dir) if args.patchset_dir else registry.patchset_dir()
        results_path = base / "support.json"
    elif not results_path.is_file():
        return _fail(f"--results {results_path}: no such file (run scripts/static_check_all.sh)")
    try:
        results = support_table.load_results(results_path)
    except support_table.SupportTableError as exc:
        return _fail(str(exc))
    rows = support_table.build_rows(loaded.patchsets, results)
    markdown = support_table.render_markdown(rows)
    readme = args.write_readme or args.check_readme
    if readme:
        path = Path(readme)
        try:
            text = path.read_text(encoding="utf-8")
            current = support_table.readme_block(text, str(path))
        except OSError as exc:
            return _fail(f"{path}: cannot read ({exc.strerror})")
        except support_table.SupportTableError as exc:
            return _fail(str(exc))
        if args.check_readme:
            rows, notes = support_table.keep_readme_where_cpu_limited(rows, current)
            markdown = support_table.render_markdown(rows)
            for note in notes:
                print(f"{path}: {note}")
            if current.strip() != markdown.strip():
                print(
                    f"{path}: the support table is stale; run `flashhead patchsets table "
                    f"--write-readme {path}`",
                    file=sys.stderr,
                )
                return 1
            print(f"{path}: support table up to date")
            return 0
        path.write_text(support_table.replace_readme_block(text, markdown, str(path)))
        print(f"{path}: support table updated ({len(rows)} releases)")
        return 0
    print(markdown if args.markdown else support_table.render_text(rows), end="")
    return 0


# ---- schema ----------------------------------------------------------------------------------
def run_schema(args: argparse.Namespace) -> int:
    from flashhead.patchset.schema import json_schema_text

    text = json_schema_text()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
        return 0
    if args.check:
        try:
            current = Path(args.check).read_text(encoding="utf-8")
        except OSError as exc:
            return _fail(f"schema: cannot read {args.check}: {exc}")
        if current != text:
            print(
                f"{args.check} is not the schema of the models; "
                f"run: flashhead patchsets schema --write {args.check}"
            )
            return 1
        print(f"{args.check} is up to date")
        return 0
    sys.stdout.write(text)
    return 0
