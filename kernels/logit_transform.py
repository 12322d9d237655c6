"""vLLM's last touch on the logits, `tanh(x / soft_cap) * soft_cap` then `* scale`, as data.

A plain value (not a closure) so that both backends apply it the same way: the torch path with
torch ops, the Triton path fused into stage 2's store, and CUDA graphs can be keyed on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    scale: float = 1.0
    soft_cap: float | None = None

    def __post_init__(self) -> None:
        if self.soft_cap is not None and not self.soft_cap > 0:
            raise ValueError(f"soft_cap must be > 0 or None, got {self.soft_cap}")

    @property
    def is_identity(self) -> bool:
        return self.soft_cap is None and self.scale == 1.0

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """The transform in torch, in the order of vLLM's ``LogitsProcessor.forward``."""
        if self.soft_cap is not None:
            scores = torch.tanh(scores / self.soft_cap) * self.soft_cap
        if self.scale != 1.0:
            scores = scores * self.scale
        return scores

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        return self.apply(scores)
