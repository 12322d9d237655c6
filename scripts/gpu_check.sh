#!/usr/bin/env bash
# One-shot GPU check for the FlashHead core (run from the repo root on a CUDA machine):
#   1. make flashhead importable without network (copy the package layout to /tmp, no pip),
#   2. run the kernel tests with the Triton interpreter OFF on CUDA tensors,
#   3. `flashhead bench --device cuda --json` at B=1/8/32 bf16 (CUDA graphs, then eager),
#   4. a small block-size sweep and per-stage timings of the Triton path.
# Results go to $OUT (default ./gpu_out): tests.log, bench_graphs.json, bench_eager.json,
# sweep.json; a short summary is printed last.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 FLASHHEAD_CPU_COMPILE=0

nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, triton, safetensors, yaml, wrapt; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/gpu.txt"

# The repo maps kernels/ -> flashhead.kernels etc. (pyproject package-dir); mirror that layout.
SITE=/tmp/flashhead_site
rm -rf "$SITE" && mkdir -p "$SITE"
cp -r flashhead "$SITE/flashhead"
for sub in kernels compat patchsets; do
  rm -rf "$SITE/flashhead/$sub" && cp -r "$sub" "$SITE/flashhead/$sub"
done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Run from outside the checkout: its own flashhead/ (without kernels/) would shadow the copy.
REPO=$PWD
mkdir -p /tmp/flashhead_run && cd /tmp/flashhead_run || exit 1
$PY -c "import flashhead.kernels.triton_ops as t; print('flashhead from', t.__file__)" 2>&1 | tee -a "$OUT/gpu.txt"

echo "== kernel tests (TRITON_INTERPRET=0, CUDA tensors)"
timeout 240 $PY -m pytest -q "$REPO/tests/kernels" -m "not slow" -p no:cacheprovider \
  --rootdir="$REPO/tests/kernels" --confcutdir="$REPO/tests/kernels" 2>&1 | tee "$OUT/tests.log" | tail -15

echo "== bench (CUDA graphs)"
timeout 150 $PY -m flashhead.cli bench --device cuda --json --batch 1,8,32 --dtype bf16 \
  --iters 200 --warmup 10 >"$OUT/bench_graphs.json" 2>"$OUT/bench_graphs.err"
echo "== bench (eager)"
timeout 100 $PY -m flashhead.cli bench --device cuda --json --batch 1,8,32 --dtype bf16 \
  --iters 100 --warmup 5 --no-graphs >"$OUT/bench_eager.json" 2>"$OUT/bench_eager.err"

echo "== sweep"
timeout 150 $PY - "$OUT/sweep.json" <<'EOF' 2>&1 | tail -40
import json, os, sys, torch, triton
from flashhead.bench import BenchConfig, make_problem
from flashhead.head import FlashHead
from flashhead.kernels import triton_ops

cfg = BenchConfig(device="cuda")
weight, assets = make_problem(cfg)
head = FlashHead.build(weight, assets)
res = {"device": torch.cuda.get_device_name(0), "stages": {}, "sweep": []}

def bench_graph(fn):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3  # us

for B in (1, 8, 32):
    h = (weight[:B].float() / 45).to(torch.bfloat16).contiguous()
    keys = triton_ops.probe_keys(h, head.index.cent_q, head.index.cent_scale)
    probes = keys.topk(256, dim=1, sorted=False).indices
    st = {
        "stage1_us": bench_graph(lambda: triton_ops.probe_keys(h, head.index.cent_q, head.index.cent_scale)),
        "topk_us": bench_graph(lambda: keys.topk(256, dim=1, sorted=False)),
        "stage2_us": bench_graph(lambda: triton_ops.candidate_scores(h, head.index, probes, want_scores=False)),
        "tokens_us": bench_graph(lambda: head.tokens(h)),
        "dense_us": bench_graph(lambda: torch.nn.functional.linear(h, weight).argmax(-1)),
        "cublas_centroids_bf16_us": bench_graph(lambda: torch.nn.functional.linear(h, head.index.cent_q.to(torch.bfloat16))),
    }
    res["stages"][B] = st
    print(B, {k: round(v, 1) for k, v in st.items()}, flush=True)

for s1 in ["16,32,128,4", "16,64,128,4", "16,16,256,4", "16,32,64,2"]:
    for s2 in ["1,256,4", "1,512,4", "2,256,8", "1,128,2"]:
        os.environ["FLASHHEAD_TRITON_S1"], os.environ["FLASHHEAD_TRITON_S2"] = s1, s2
        row = {"s1": s1, "s2": s2}
        try:
            for B in (1, 8, 32):
                h = (weight[:B].float() / 45).to(torch.bfloat16).contiguous()
                row[f"B{B}_us"] = bench_graph(lambda: head.tokens(h))
        except Exception as exc:
            row["error"] = repr(exc)[:200]
        res["sweep"].append(row)
        print(row, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
EOF

echo "== summary"
$PY - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for name in ("bench_graphs.json", "bench_eager.json"):
    try:
        info = json.loads((out / name).read_text())
    except Exception as exc:
        print(name, "missing:", exc, (out / name.replace(".json", ".err")).read_text()[-1500:] if (out / name.replace(".json", ".err")).exists() else "")
        continue
    print(name, info["device_name"], "backend", info["backend"], "bw", round(info["bandwidth_gbs"] or 0), "GB/s",
          "graphs", {k: v for k, v in (info.get("cuda_graphs") or {}).items() if not k.endswith("_error")})
    for r in info["results"]:
        print(f"  B={r['batch']:<3} dense {r['dense_ms']*1e3:7.1f} us  flash {r['flash_ms']*1e3:7.1f} us  "
              f"ratio {r['ratio']:5.2f}x  floor share dense {r['dense_floor_share']:.0%} flash {r['flash_floor_share']:.0%}  agree {r['agreement']:.3f}")
EOF
