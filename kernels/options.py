"""How the FlashHead core runs: backend, dense hand-over, CPU compile, Triton tuning.

The kernels read no environment. `flashhead.settings` builds a `KernelOptions` from the
``FLASHHEAD_*`` variables once per process; tests and benchmarks pass their own.
"""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "triton", "torch")
SELECT_METHODS = ("bisect", "radix")


@dataclass(frozen=True)
class KernelOptions:
    # auto = Triton for CUDA tensors when Triton imports, torch otherwise.
    backend: str = "auto"
    # Hand batches of this many rows or more to the dense head (0 = never); None = the rule.
    dense_min_batch: int | None = None
    # The CPU fast path's torch.compile'd gather-dot (off: gather + GEMV).
    cpu_compile: bool = True
    # Triton top-p select: bisect (the method timed on a GPU) or radix.
    triton_select: str = "bisect"
    # Block-size overrides for Triton tuning runs; None = the built-in choice.
    triton_stage1_blocks: tuple[int, int, int, int, int] | None = None  # B, C, D, warps, stages
    triton_stage2_blocks: tuple[int, int, int, int] | None = None  # rows, D, warps, stages
    triton_select_warps: int | None = None
    # FlashHead's own CUDA graphs for the logits path on a GPU (flashhead.cuda_graphs).
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.triton_select not in SELECT_METHODS:
            raise ValueError(
                f"triton_select {self.triton_select!r}: expected one of {', '.join(SELECT_METHODS)}"
            )
        if self.dense_min_batch is not None and self.dense_min_batch < 0:
            raise ValueError(f"dense_min_batch {self.dense_min_batch}: expected >= 0")


DEFAULT_OPTIONS = KernelOptions()
