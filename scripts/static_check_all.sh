#!/usr/bin/env bash
# Static check of every patchset against one vLLM release per minor (0.10 -> newest, plus 0.10.0).
#
# For each release in flashhead.support_table.CI_RELEASES: fetch its sdist (cached under
# $FLASHHEAD_CACHE or ~/.cache/flashhead; no vLLM build, no import) and run
# `flashhead patchsets check --vllm-version X --json`, JOBS at a time. Writes the results file the
# support table reads (default patchsets/support.json; run-time results already in it are kept)
# and exits 1 when any release has a mismatch or a range problem, 2 when a check could not run.
#
# With --runtime PY (repeatable; a venv's python with vLLM and flashhead installed) it also runs
# `flashhead doctor --json` there: the patch engine against that installed vLLM, recorded as the
# run-time check of its release.
#
# usage: scripts/static_check_all.sh [--results FILE] [--jobs N] [--releases "X Y ..."]
#                                    [--runtime PY]...
# env:   PYTHON (default: python3 on PATH), FLASHHEAD_CACHE, JOBS (default 6)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
# Not the checkout on sys.path: its kernels/ would shadow PyPI's `kernels` (see scripts/test.sh).
export PYTHONSAFEPATH=1
results="$repo/patchsets/support.json"
jobs="${JOBS:-6}"
releases=""
runtimes=()

while [ $# -gt 0 ]; do
  case "$1" in
    --results) results="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    --releases) releases="$2"; shift 2 ;;
    --runtime) runtimes+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "static_check_all.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if ! "$python" -c "import flashhead.staticcheck" 2>/dev/null; then
  echo "static_check_all.sh: '$python' cannot import flashhead; set PYTHON to the venv's python" \
       "or run 'pip install -e $repo'" >&2
  exit 2
fi
if [ -z "$releases" ]; then
  releases="$("$python" -c 'from flashhead.support_table import CI_RELEASES; print(" ".join(CI_RELEASES))')"
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$(date +%s)

# One process per release: fetching is safe in parallel (per-release lock, atomic publish).
export python out
printf '%s\n' $releases | xargs -P "$jobs" -I{} sh -c '
  "$python" -m flashhead.cli patchsets check --vllm-version "$1" --json \
    >"$out/$1.json" 2>"$out/$1.err"
  echo $? >"$out/$1.rc"
' _ {}

# Run-time checks, one venv at a time (each imports vLLM: memory-heavy).
i=0
for rt in "${runtimes[@]+"${runtimes[@]}"}"; do
  i=$((i + 1))
  HF_HUB_OFFLINE=1 timeout 600 "$rt" -m flashhead.cli doctor --json \
    >"$out/runtime-$i.json" 2>"$out/runtime-$i.err" || true
done

rc=0
"$python" - "$out" "$results" $releases <<'EOF' || rc=$?
import json, re, sys
from pathlib import Path
from flashhead.support_table import load_results, write_results

out, results_path, releases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
previous = load_results(results_path).get("releases", {})
merged = {v: dict(r) for v, r in previous.items()}
worst = 0
for v in releases:
    rc = int((out / f"{v}.rc").read_text().strip() or 2)
    entry = merged.setdefault(v, {})
    try:
        report = json.loads((out / f"{v}.json").read_text())
    except ValueError:
        report = None
    if report is None or rc not in (0, 1):
        err = (out / f"{v}.err").read_text().strip().splitlines()
        entry.update(static_check="error", patchset="")
        print(f"{v:8} ERROR   {err[-1] if err else f'exit {rc}'}")
        worst = max(worst, 2)
        continue
    bad = [r for r in report["rows"] if r["status"] != "ok"]
    status = "ok" if report["ok"] else (
        "no patchset" if report["triage"] else
        f"{len(bad)} mismatch(es)" if bad else "range problem")
    entry.update(static_check=status, patchset=Path(report["patchset"]).name)
    print(f"{v:8} {status:12} {Path(report['patchset']).name}")
    for r in bad:
        print(f"         {r['patch_id']}: {r['target']}: {r['status']}: {r['detail']}")
    for p in report["range_problems"]:
        print(f"         ranges: {p}")
    if not report["ok"]:
        worst = max(worst, 1)
for rt in sorted(out.glob("runtime-*.json")):
    try:
        # vLLM may log to stdout before the report: the JSON starts at a line "{".
        text = rt.read_text()
        doc = json.loads(text[re.search(r"^\{$", text, re.M).start():])
        release = doc["vllm"]["release_for_matching"]
    except (ValueError, KeyError, TypeError, AttributeError):
        err = rt.with_suffix(".err").read_text().strip().splitlines()
        print(f"runtime  ERROR   {err[-1] if err else 'doctor gave no JSON'}")
        worst = max(worst, 2)
        continue
    failed = [p["id"] for p in doc.get("patches", []) if p.get("status") not in ("applied", "pending")]
    status = "ok" if doc.get("ok") and not failed else f"failed: {', '.join(failed) or 'see doctor'}"
    merged.setdefault(release, {})["runtime_check"] = status
    print(f"{release:8} run-time {status}")
    if status != "ok":
        worst = max(worst, 1)
write_results(results_path, merged)
print(f"results: {results_path}")
sys.exit(worst)
EOF
echo "static check of $(echo $releases | wc -w) releases: $(( $(date +%s) - start )) s, exit $rc"
exit $rc
