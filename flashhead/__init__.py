"""flashhead: FlashHead (two-stage cluster-retrieval LM head) as a vLLM plugin.

Importing this package must stay cheap and side-effect free: vLLM imports it in every process
(API server, engine core, workers) through the `vllm.general_plugins` entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "register"]


def register() -> None:
    """vLLM plugin entry point. Idempotent per process; never raises."""
    try:
        from flashhead.plugin import register as _register
    except Exception as exc:  # pragma: no cover - a broken install must not take vLLM down
        import logging

        logging.getLogger("flashhead").error(
            "flashhead: plugin import failed, vLLM runs stock: %r", exc
        )
        return
    _register()
