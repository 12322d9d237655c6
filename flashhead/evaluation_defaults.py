"""`flashhead eval`'s defaults and text families, apart from `flashhead.evaluation` so that the
CLI can build its parser without importing torch."""

from __future__ import annotations

DEFAULT_PROBES = (16, 32, 64, 128, 256, 512, 1024)
DEFAULT_TARGETS = (0.99, 0.995, 0.999)
FAMILIES = ("prose", "code", "docstrings", "markdown", "qa", "chat", "self")
