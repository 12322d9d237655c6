#!/usr/bin/env bash
# One-shot GPU check of FlashHead (run from the repo root on a CUDA machine; no network, no pip):
#   1. make flashhead importable (copy the package layout to /tmp),
#   2. the kernel tests with the Triton interpreter OFF on CUDA tensors, the CUDA-graph and
#      no-sync tests among them (tests/kernels/test_kernels_cuda_graphs.py),
#   3. `flashhead bench --device cuda`: vLLM's logits call, eager on an idle GPU and behind a
#      busy one, with the CUDA-graph column; greedy and sampled rows; both head shapes,
#   4. per-stage timings at both shapes (scripts/gpu_stages.py), last: the least needed.
# Results go to $OUT (default ./gpu_out): gpu.txt, tests.log, bench.json (every bench's report),
# bench.err, stages.json, and a summary line after each bench (at most 8 files come back from
# the device tool). GPU_CHECK_QUICK=1 (a rerun): only the kernel, logits and CUDA-graph tests,
# three benches. GPU_CHECK_SWEEP=1: select warps and radix at every shape, the tokens-mode bench.
# A full run took ~6 min on an H200 (tests 3 min); last results: docs/gpu-notes.md.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 FLASHHEAD_CPU_COMPILE=0

nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/gpu.txt"

# The repo maps kernels/ -> flashhead.kernels etc. (pyproject package-dir); mirror that layout.
SITE=/tmp/flashhead_site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r flashhead "$SITE/flashhead"
for sub in kernels compat patchsets; do
  rm -rf "$SITE/flashhead/$sub" && cp -r "$sub" "$SITE/flashhead/$sub"
done
REPO=$PWD
# The site copy first (the checkout's flashhead/ has no kernels/), the checkout for tests.helpers.
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p /tmp/flashhead_run && cd /tmp/flashhead_run || exit 1
$PY -c "import flashhead.kernels.triton_ops as t; print('flashhead from', t.__file__)" 2>&1 | tee -a "$OUT/gpu.txt"

echo "== kernel tests (TRITON_INTERPRET=0, CUDA tensors)"
XDIST=()
$PY -c "import xdist" 2>/dev/null && XDIST=(-n 8)  # Triton compiles on 8 CPU cores at once
TESTS=("$REPO/tests/kernels")
if [ "${GPU_CHECK_QUICK:-0}" = "1" ]; then  # a rerun: the kernels' own tests and the graphs'
  TESTS=("$REPO/tests/kernels/test_kernels_triton.py" "$REPO/tests/kernels/test_kernels_logits.py"
    "$REPO/tests/kernels/test_kernels_cuda_graphs.py")
fi
timeout 240 $PY -m pytest -q "${TESTS[@]}" -m "not slow" -p no:cacheprovider "${XDIST[@]}" \
  --rootdir="$REPO/tests/kernels" --confcutdir="$REPO/tests/kernels" -rfs >"$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -20

cat >/tmp/flashhead_run/summary.py <<'PYEOF'
import json, pathlib, sys

out, bench = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
reports = {}
newest = max(bench.glob("bench_*.json"), key=lambda p: p.stat().st_mtime)
for path in sorted(bench.glob("bench_*.json")):
    try:
        info = reports[path.stem] = json.loads(path.read_text())
    except Exception as exc:
        if path == newest:
            print(path.name, "missing:", exc, "(see bench.err)")
        continue
    if path != newest:
        continue
    print(f"{path.stem}: {info['device_name']} torch {info['torch']} triton {info['triton']} "
          f"bw {round(info['bandwidth_gbs'] or 0)} GB/s backend {info['backend']} select {info['triton_select']}")
    for r in info["results"]:
        g = r.get("flash_graph_ms")
        print(
            f"  B={r['batch']:<3} eager: dense {r['dense_ms'] * 1e3:6.1f} us  flash {r['flash_ms'] * 1e3:6.1f} us "
            f"({r['flash_path']}) {r['ratio']:5.2f}x | behind fwd: dense {(r.get('dense_behind_ms') or 0) * 1e3:6.1f} "
            f"flash {(r.get('flash_behind_ms') or 0) * 1e3:6.1f} us {(r.get('ratio_behind') or 0):5.2f}x | graphs: dense {(r.get('dense_graph_ms') or 0) * 1e3:6.1f} "
            f"flash {(g or 0) * 1e3:6.1f} us {(r.get('ratio_graph') or 0):5.2f}x | eager/graph "
            f"{(r.get('eager_over_graph') or 0):4.2f} behind/graph {(r.get('behind_over_graph') or 0):4.2f} | floor dense {r.get('dense_floor_share') or 0:.0%} "
            f"flash {r.get('flash_floor_share') or 0:.0%} (graph {r.get('flash_graph_floor_share') or 0:.0%}) "
            f"agree {r['agreement'] if r['agreement'] is None else round(r['agreement'], 3)}"
        )
    errs = {k: v for k, v in (info.get("cuda_graphs") or {}).items() if k.endswith("_error")}
    if errs:
        print("  graph errors:", errs)
    print("  flashhead graphs:", info["head"].get("cuda_graphs"))
(out / "bench.json").write_text(json.dumps(reports, indent=1))
PYEOF
BENCH=/tmp/flashhead_run/bench
mkdir -p "$BENCH"
bench() {  # name, then bench arguments
  local name=$1; shift
  echo "== $name: $*" >>"$OUT/bench.err"
  timeout 100 $PY -m flashhead.cli bench --device cuda --json --dtype bf16 --iters 100 --warmup 5 "$@" \
    >"$BENCH/bench_$name.json" 2>>"$OUT/bench.err"
  $PY /tmp/flashhead_run/summary.py "$OUT" "$BENCH"  # after each: a killed run keeps the lines
}
echo "== bench: vLLM's logits call, eager + CUDA-graph column"
if [ "${GPU_CHECK_QUICK:-0}" = "1" ]; then
  bench llama_greedy --shape llama3.2 --batch 1,8
  bench gemma_greedy --shape gemma3 --batch 1,8
  bench llama_sampled --shape llama3.2 --batch 1,8 --temperature 0.8
else
  bench llama_greedy --shape llama3.2 --batch 1,8,16,32
  bench llama_sampled --shape llama3.2 --batch 1,8 --temperature 0.8
  bench gemma_greedy --shape gemma3 --batch 1,8,32
  bench gemma_sampled --shape gemma3 --batch 1,8 --temperature 0.8
fi

if [ "${GPU_CHECK_SWEEP:-0}" = "1" ]; then
  echo "== tokens mode (the head alone, as timed before)"
  bench llama_tokens --shape llama3.2 --batch 1,8,32 --mode tokens
fi

echo "== stages (CUDA graphs, both shapes, bisect vs radix select)"
timeout 120 $PY "$REPO/scripts/gpu_stages.py" "$OUT" 2>&1 | tail -8
if $PY -c "import json,sys; sys.exit(0 if json.load(open('$OUT/stages.json'))['radix_faster_everywhere'] else 1)" 2>/dev/null; then
  export FLASHHEAD_TRITON_SELECT=radix
fi
echo "select found faster: ${FLASHHEAD_TRITON_SELECT:-bisect}"

