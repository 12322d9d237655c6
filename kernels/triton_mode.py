"""Whether Triton runs its interpreter, asked of Triton itself.

Triton 3.4 and later keep the switch in ``triton.knobs`` (read from TRITON_INTERPRET when
triton is imported); earlier releases test the variable themselves each time a kernel is
declared, so this mirrors their own test there.
"""

from __future__ import annotations


def triton_interpreting() -> bool:
    try:
        import triton.knobs as knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        import os

        return os.environ.get("TRITON_INTERPRET", "0") == "1"
