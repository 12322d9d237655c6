"""Process-global FlashHead state that handlers consult at run time.

The plugin installs the engine and the activation here once per process; handlers ask
:func:`flashhead_active` before doing FlashHead work (False before activation, with
``FLASHHEAD_ENABLED=0``, after a rollback of the patch set, or once the kill switch is thrown).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from flashhead.settings import ENABLED_ENV, settings

if TYPE_CHECKING:
    from flashhead.engine import PatchEngine, PatchRecord

__all__ = [
    "ENABLED_ENV",
    "activation",
    "engine",
    "env_enabled",
    "flashhead_active",
    "install",
    "kill",
    "kill_reason",
    "kill_switch_on",
    "records",
    "reset",
    "revive",
]


_lock = threading.Lock()
_engine: PatchEngine | None = None
_activation: Any = None  # flashhead.plugin.Activation (kept untyped: no import cycle)
_main_set: str | None = None
_killed = False
_kill_reason = ""


def env_enabled() -> bool:
    """``FLASHHEAD_ENABLED`` is not false (unset means enabled; flashhead.settings)."""
    return settings().enabled


def install(engine_: PatchEngine, activation_: Any, main_set: str | None) -> None:
    global _engine, _activation, _main_set
    with _lock:
        _engine, _activation, _main_set = engine_, activation_, main_set


def engine() -> PatchEngine | None:
    return _engine


def activation() -> Any:
    return _activation


def kill(reason: str = "kill switch") -> None:
    """Runtime kill switch: every FlashHead patch passes straight through from now on."""
    global _killed, _kill_reason
    with _lock:
        _killed, _kill_reason = True, reason


def revive() -> None:
    global _killed, _kill_reason
    with _lock:
        _killed, _kill_reason = False, ""


def kill_switch_on() -> bool:
    """The `enabled` callable the plugin gives the engine for FlashHead patches."""
    return not _killed


def kill_reason() -> str:
    return _kill_reason


def flashhead_active() -> bool:
    eng, main_set = _engine, _main_set
    if _killed or eng is None or main_set is None:
        return False
    if _activation is not None and not getattr(_activation, "flashhead_enabled", True):
        return False
    return eng.set_active(main_set)


def records() -> list[PatchRecord]:
    eng = _engine
    return eng.records() if eng is not None else []


def reset() -> None:
    """Undo everything and forget the activation (tests; doctor)."""
    global _engine, _activation, _main_set, _killed, _kill_reason
    with _lock:
        eng = _engine
        _engine, _activation, _main_set, _killed, _kill_reason = None, None, None, False, ""
    if eng is not None:
        eng.unpatch()
