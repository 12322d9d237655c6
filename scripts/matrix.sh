#!/usr/bin/env bash
# The run-time matrix: for each vLLM release given, build its venv (scripts/make_vllm_env.sh),
# install this checkout into it, and run the release smoke (tests/matrix) on real `vllm serve`.
# Each release's outcome goes to the results file as its run-time check (the support table's
# column): "ok (serves flashhead)", "ok (serves dense)", "smoke failed", or
# "not installable: <why>".
#
# usage: scripts/matrix.sh [--results FILE] [--clean] X [X ...]
#   --results FILE  merge outcomes into FILE (default: $FLASHHEAD_CACHE/matrix.json)
#   --clean         delete each release's venv after its smoke (CUDA-torch venvs are 4-8 GB)
# $PYTHON (default python3) records the outcomes: it must import an *installed* flashhead
# (flashhead.compat lives in compat/, so PYTHONPATH=<checkout> is not enough).
# exit: 0 all smokes passed (or the release cannot be installed here), 1 a smoke failed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FLASHHEAD_CACHE=${FLASHHEAD_CACHE:-$HOME/.cache/flashhead}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
results="$FLASHHEAD_CACHE/matrix.json"; clean=0; releases=()
while [ $# -gt 0 ]; do
  case "$1" in
    --results) results="$2"; shift 2 ;;
    --clean) clean=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "matrix.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    *) releases+=("$1"); shift ;;
  esac
done
[ ${#releases[@]} -gt 0 ] || { echo "matrix.sh: name at least one release, e.g. 0.23.0" >&2; exit 2; }

recorder=${PYTHON:-python3}
# Checked before any venv is built: a recorder that cannot import the table code would otherwise
# fail after the first release (CI 2026-12-04: 44 minutes in).
if ! "$recorder" -c "import flashhead.support_table" 2>/dev/null; then
  echo "matrix.sh: $recorder cannot import flashhead.support_table; set PYTHON to an interpreter" \
    "with this checkout installed (pip install -e $repo)" >&2
  exit 2
fi

record() {  # release, outcome, seconds: merged with the support table's own results I/O
  mkdir -p "$(dirname "$results")"
  "$recorder" - "$results" "$1" "$2" "$3" <<'EOF'
import sys
from pathlib import Path
from flashhead.support_table import load_results, write_results
path, release, outcome, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
releases = load_results(path)["releases"]
releases.setdefault(release, {}).update(runtime_check=outcome, runtime_seconds=int(seconds))
write_results(path, releases)
EOF
}

build() {  # release: its venv, output to its log (make_vllm_env.sh is idempotent)
  "$repo/scripts/make_vllm_env.sh" "$1" "$FLASHHEAD_CACHE/venvs/vllm-$1" \
    > "$FLASHHEAD_CACHE/matrix-env-$1.log" 2>&1 || true
}

mkdir -p "$FLASHHEAD_CACHE/venvs"
worst=0; prefetch=""; prefetched=""
for idx in "${!releases[@]}"; do
  ver="${releases[$idx]}"; next="${releases[$((idx + 1))]:-}"
  start=$(date +%s)
  venv="$FLASHHEAD_CACHE/venvs/vllm-$ver"
  printf '\n=== [%s] vLLM %s: venv\n' "$(date +%H:%M:%S)" "$ver"
  envlog="$FLASHHEAD_CACHE/matrix-env-$ver.log"
  if [ "$prefetched" = "$ver" ]; then wait "$prefetch" || true; else build "$ver"; fi
  prefetch=""; prefetched=""
  cat "$envlog"
  # The next release's venv builds (downloads, unpacking: mostly I/O) while this one's smoke
  # runs (CPU): about 2.5 minutes saved a release.
  if [ -n "$next" ] && [ "$next" != "$ver" ]; then build "$next" & prefetch=$!; prefetched="$next"; fi
  if ! "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    why=$(grep -m1 "cannot be installed here" "$envlog" | sed 's/.*cannot be installed here: //' || true)
    echo "vLLM $ver: not installable here: ${why:-see make_vllm_env.sh output}"
    record "$ver" "not installable: ${why:-make_vllm_env.sh failed}" $(( $(date +%s) - start ))
    rm -rf "$venv"
    continue
  fi
  "$venv/bin/pip" install -q --no-deps -e "$repo" 2>&1 | grep -vE '^(WARNING: Location|$)' || true
  printf '=== [%s] vLLM %s: smoke\n' "$(date +%H:%M:%S)" "$ver"
  if (cd "$repo" && "$venv/bin/python" -m pytest -q -p no:cacheprovider -m matrix tests/matrix); then
    serve=$("$venv/bin/python" -c "
from flashhead.compat.version import detect_vllm_version as d
from flashhead.registry import load_patchsets, select_patchset
print(select_patchset(load_patchsets().patchsets, d().release_for_matching).serve)" 2>/dev/null | tail -1)
    outcome="ok (serves ${serve:-?})"
  else
    outcome="smoke failed"; worst=1
  fi
  secs=$(( $(date +%s) - start ))
  echo "vLLM $ver: $outcome in ${secs} s"
  record "$ver" "$outcome" "$secs"
  [ $clean = 1 ] && rm -rf "$venv"
done
[ -z "$prefetch" ] || wait "$prefetch" || true
echo "results: $results"
exit $worst
