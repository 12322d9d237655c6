"""A trivial observable handler: proves that patches reach the logits path of the worker.

It counts calls and logs the first one per process, then calls the original unchanged.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

logger = logging.getLogger("flashhead")

_lock = threading.Lock()
_calls = 0


def count_logits_calls(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """wrapt wrapper for ``LogitsProcessor.forward``: count, log once, call through."""
    global _calls
    with _lock:
        _calls += 1
        first = _calls == 1
    if first:
        from flashhead.compat.process import current_process_kind

        logger.info(
            "flashhead: observe-logits: first logits call in %s process (pid %d, %s)",
            current_process_kind(),
            os.getpid(),
            type(instance).__name__,
        )
    return wrapped(*args, **kwargs)


def logits_call_count() -> int:
    return _calls


def reset_logits_call_count() -> None:
    global _calls
    with _lock:
        _calls = 0
