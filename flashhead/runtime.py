"""The FlashHead state of this process that handlers consult at run time.

The plugin installs one ``Runtime`` per process (the engine, the activation and the patch set
that serves FlashHead); handlers ask :func:`flashhead_active` before doing FlashHead work (False
before activation, with ``FLASHHEAD_ENABLED=0``, after a rollback of the patch set, or once
the kill switch is thrown). The module functions are the interface; ``current()`` is the
object behind them.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flashhead.settings import ENABLED_ENV, settings

if TYPE_CHECKING:
    from flashhead.engine import PatchEngine, PatchRecord

__all__ = [
    "ENABLED_ENV",
    "Runtime",
    "activation",
    "current",
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


@dataclass(frozen=True)
class Runtime:
    engine: PatchEngine | None = None
    activation: Any = None  # flashhead.plugin.Activation (untyped here: no import cycle)
    main_set: str | None = None  # the patch set whose activity means "FlashHead serves"
    killed: bool = False
    kill_reason: str = ""

    def flashhead_active(self) -> bool:
        if self.killed or self.engine is None or self.main_set is None:
            return False
        if self.activation is not None and not getattr(self.activation, "flashhead_enabled", True):
            return False
        return self.engine.set_active(self.main_set)


_lock = threading.Lock()
# Replaced whole under the lock, read without it: a reader sees one consistent state.
_current = Runtime()


def current() -> Runtime:
    return _current


def _replace(**changes: Any) -> Runtime:
    global _current
    with _lock:
        _current = dataclasses.replace(_current, **changes)
        return _current


def env_enabled() -> bool:
    """``FLASHHEAD_ENABLED`` is not false (unset means enabled; flashhead.settings)."""
    return settings().enabled


def install(engine_: PatchEngine, activation_: Any, main_set: str | None) -> None:
    _replace(engine=engine_, activation=activation_, main_set=main_set)


def engine() -> PatchEngine | None:
    return _current.engine


def activation() -> Any:
    return _current.activation


def kill(reason: str = "kill switch") -> None:
    """Runtime kill switch: every FlashHead patch passes straight through from now on."""
    _replace(killed=True, kill_reason=reason)


def revive() -> None:
    _replace(killed=False, kill_reason="")


def kill_switch_on() -> bool:
    """The `enabled` callable the plugin gives the engine for FlashHead patches."""
    return not _current.killed


def kill_reason() -> str:
    return _current.kill_reason


def flashhead_active() -> bool:
    return _current.flashhead_active()


def support() -> tuple[str, dict[str, str]] | None:
    """(patchset name, its support block) of this process's activation; None before one."""
    patchset = getattr(_current.activation, "patchset", None)
    if patchset is None:
        return None
    return patchset.name, dict(patchset.support)


def records() -> list[PatchRecord]:
    eng = _current.engine
    return eng.records() if eng is not None else []


def reset() -> None:
    """Undo everything and forget the activation (tests; doctor)."""
    global _current
    with _lock:
        eng, _current = _current.engine, Runtime()
    if eng is not None:
        eng.unpatch()
