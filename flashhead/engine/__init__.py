"""A generic, version-checked patch engine built on wrapt. It knows nothing of FlashHead or vLLM.

For each patch: resolve the target (now, or through a wrapt post-import hook when its module is
not imported yet), verify the live signature against the declared one, resolve the handler, let
the patch's *kind* install it, and record the outcome. Kinds ``wrap`` and ``replace`` are built
in; hosts plug in more (``PatchEngine(kinds=...)``).

Guarantees (docs/DESIGN.md, "Engine contract"):
- a required patch that fails undoes every patch of its set already applied;
- a ``wrap`` handler that raises at run time: the original runs instead, the patch disables
  itself, the record becomes ``runtime-error``; exceptions of the original propagate unchanged;
- ``unpatch`` is the symmetric undo and is idempotent; ``apply`` never double-wraps, even across
  engine instances; post-import hooks never raise into the host's import; a lock serialises all.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import wrapt

from flashhead.engine.contract import (
    _ROLLED_BACK_FROM,
    FAILED_STATUSES,
    HOOK_LOCK_TIMEOUT_S,
    SKIPPED_STATUSES,
    STATUSES,
    ApplyContext,
    Kind,
    PatchFailure,
    PatchRecord,
    PatchTarget,
    RequiredSymbol,
    Status,
    Undo,
)
from flashhead.engine.kinds import ReplaceKind, WrapKind
from flashhead.engine.targets import (
    check_requirement,
    check_signature,
    import_callable,
    import_module_of,
    resolve_static,
    signature_subject,
)

__all__ = [
    "FAILED_STATUSES",
    "SKIPPED_STATUSES",
    "STATUSES",
    "Status",
    "ApplyContext",
    "Kind",
    "PatchEngine",
    "PatchFailure",
    "PatchRecord",
    "PatchTarget",
    "RequiredSymbol",
    "ReplaceKind",
    "WrapKind",
    "resolve_static",
]

logger = logging.getLogger("flashhead")


# --------------------------------------------------------------------------------------------
# The engine


@dataclass(eq=False)
class _Entry:
    spec: PatchTarget
    record: PatchRecord
    set_id: str
    undo: Undo | None = None
    live: bool = True  # False once disabled at run time, rolled back or unpatched
    hook_armed: bool = False


@dataclass(eq=False)
class _SetState:
    set_id: str
    enabled: Callable[[], bool]
    entries: list[_Entry] = field(default_factory=list)
    active: bool = True
    rolled_back: bool = False
    rollback_reason: str = ""


class PatchEngine:
    def __init__(self, kinds: Mapping[str, Kind] | None = None):
        self._kinds: dict[str, Kind] = {"wrap": WrapKind(), "replace": ReplaceKind()}
        self._kinds.update(kinds or {})
        self._lock = threading.RLock()
        self._sets: dict[str, _SetState] = {}

    # -- public API ------------------------------------------------------------------------
    @property
    def kinds(self) -> Mapping[str, Kind]:
        return dict(self._kinds)

    def apply(
        self,
        patches: Sequence[PatchTarget],
        *,
        set_id: str,
        enabled: Callable[[], bool],
        force_import: bool = False,
    ) -> list[PatchRecord]:
        """Apply a set of patches; returns their records. Re-applying a set first undoes it."""
        with self._lock:
            if set_id in self._sets:
                self._unpatch_set(self._sets.pop(set_id))
            state = _SetState(set_id, enabled)
            self._sets[set_id] = state
            for spec in patches:
                entry = _Entry(spec, _new_record(spec, set_id, "pending"), set_id)
                state.entries.append(entry)
                if state.rolled_back:
                    entry.live = False
                    entry.record.status = Status.ROLLED_BACK
                    entry.record.reason = state.rollback_reason
                    continue
                self._attempt(state, entry, force_import=force_import)
            return [e.record for e in state.entries]

    def record_skipped(
        self, spec: PatchTarget, *, set_id: str, status: str, reason: str
    ) -> PatchRecord:
        """Record a patch the host decided not to apply (skipped-version, skipped-process, disabled)."""
        if status not in SKIPPED_STATUSES:
            raise ValueError(f"not a skip status: {status!r}")
        with self._lock:
            state = self._sets.setdefault(set_id, _SetState(set_id, lambda: False))
            entry = _Entry(spec, _new_record(spec, set_id, status, reason), set_id, live=False)
            state.entries.append(entry)
            return entry.record

    def unpatch(self, set_id: str | None = None) -> None:
        """Undo one set (or all), newest patch first. Idempotent."""
        with self._lock:
            ids = [set_id] if set_id is not None else list(self._sets)[::-1]
            for sid in ids:
                state = self._sets.pop(sid, None)
                if state is not None:
                    self._unpatch_set(state)

    def records(self, set_id: str | None = None) -> list[PatchRecord]:
        with self._lock:
            if set_id is None:
                states = list(self._sets.values())
            else:
                states = [self._sets[set_id]] if set_id in self._sets else []
            return [e.record for s in states for e in s.entries]

    def set_active(self, set_id: str) -> bool:
        """True while the set is applied and was not rolled back."""
        with self._lock:
            state = self._sets.get(set_id)
            return bool(state and state.active and not state.rolled_back)

    # -- internals -------------------------------------------------------------------------
    def _attempt(self, state: _SetState, entry: _Entry, *, force_import: bool) -> None:
        spec = entry.spec
        kind = self._kinds.get(spec.kind)
        if kind is None:
            self._fail(
                state,
                entry,
                PatchFailure("handler-error", f"no kind {spec.kind!r} plugged into the engine"),
            )
            return
        module_name = spec.module
        if module_name not in sys.modules and not (force_import or kind.eager_import):
            self._arm_hook(state, entry)
            return
        try:
            self._install(state, entry, kind)
        except PatchFailure as exc:
            self._fail(state, entry, exc)
        except Exception as exc:  # a kind's bug or the host refusing: never escape apply()
            self._fail(state, entry, PatchFailure("handler-error", f"{type(exc).__name__}: {exc}"))

    def _arm_hook(self, state: _SetState, entry: _Entry) -> None:
        entry.record.status = Status.PENDING
        entry.record.reason = f"waits for import of {entry.spec.module}"
        entry.hook_armed = True

        def on_import(_module: Any) -> None:
            # Runs inside the host's import: must never raise.
            try:
                # The host holds this module's import lock while hooks run; another thread may
                # hold the engine lock while it waits for that import. Never wait forever.
                if not self._lock.acquire(timeout=HOOK_LOCK_TIMEOUT_S):
                    entry.record.reason = "engine busy during import; not applied"
                    logger.error("flashhead: %s not applied: engine lock timeout", entry.spec.id)
                    return
                try:
                    if not entry.hook_armed or self._sets.get(state.set_id) is not state:
                        return  # unpatched, rolled back or re-applied since
                    entry.hook_armed = False
                    self._attempt(state, entry, force_import=True)
                    logger.debug(
                        "flashhead: %s -> %s (after import)", entry.spec.id, entry.record.status
                    )
                finally:
                    self._lock.release()
            except BaseException as exc:  # noqa: BLE001 - the host's import must survive
                try:
                    logger.error(
                        "flashhead: post-import hook for %s failed: %r", entry.spec.id, exc
                    )
                except BaseException:  # noqa: BLE001
                    pass

        wrapt.register_post_import_hook(on_import, entry.spec.module)

    def _install(self, state: _SetState, entry: _Entry, kind: Kind) -> None:
        spec = entry.spec
        import_module_of(spec.module)
        owner, attr, raw, own = resolve_static(spec.target)
        target = getattr(owner, attr)
        if spec.signature is not None:
            check_signature(
                spec.target, spec.signature, signature_subject(target, raw, spec.signature_of)
            )
        for req in spec.requires:
            check_requirement(req)
        handler = None
        if spec.handler is not None:
            try:
                handler = import_callable(spec.handler)
            except Exception as exc:
                raise PatchFailure(
                    "handler-error",
                    f"cannot load handler {spec.handler}: {type(exc).__name__}: {exc}",
                ) from None

        def enabled() -> bool:
            if not (entry.live and state.active and not state.rolled_back):
                return False
            try:
                return bool(state.enabled())
            except Exception:  # a broken kill switch means "off"
                return False

        ctx = ApplyContext(
            spec=spec,
            owner=owner,
            attr=attr,
            raw=raw,
            own=own,
            target=target,
            handler=handler,
            enabled=enabled,
            on_runtime_error=lambda exc: self._runtime_error(entry, exc),
            record=entry.record,
            patch_key=f"{spec.target}#{spec.id}",
        )
        undo = kind.apply(ctx)
        entry.undo = undo
        entry.record.status = Status.APPLIED
        entry.record.reason = ""

    def _fail(self, state: _SetState, entry: _Entry, exc: PatchFailure) -> None:
        entry.live = False
        entry.record.status = exc.status
        entry.record.reason = exc.reason
        if entry.spec.required:
            self._rollback(state, entry)
        else:
            logger.warning(
                "flashhead: optional patch %s not applied: %s: %s",
                entry.spec.id,
                exc.status,
                exc.reason,
            )

    def _rollback(self, state: _SetState, culprit: _Entry) -> None:
        reason = f"required patch {culprit.spec.id} failed ({culprit.record.status}: {culprit.record.reason})"
        state.rolled_back = True
        state.rollback_reason = reason
        self._unpatch_set(state)
        for entry in state.entries:
            # The culprit keeps its failure; skipped and other failed records stay as they are.
            if entry is not culprit and entry.record.status in _ROLLED_BACK_FROM:
                entry.record.status = Status.ROLLED_BACK
                entry.record.reason = reason
        logger.error("flashhead: set %s rolled back: %s", state.set_id, reason)

    def _runtime_error(self, entry: _Entry, exc: BaseException) -> None:
        with self._lock:
            first = entry.live
            entry.live = False
            entry.record.status = Status.RUNTIME_ERROR
            entry.record.reason = (
                f"handler raised {type(exc).__name__}: {exc}; the original ran instead"
            )
        if first:
            logger.error(
                "flashhead: patch %s disabled: handler raised at run time; the original ran instead",
                entry.spec.id,
                exc_info=exc,
            )

    def _unpatch_set(self, state: _SetState) -> None:
        state.active = False
        for entry in reversed(state.entries):
            entry.hook_armed = False
            entry.live = False
            if entry.undo is not None:
                _safe_undo(entry)


def _safe_undo(entry: _Entry) -> None:
    undo, entry.undo = entry.undo, None
    if undo is None:
        return
    try:
        undo()
    except Exception as exc:  # undo must not leave the rest of a set applied
        logger.error("flashhead: undo of %s failed: %r", entry.spec.id, exc)


def _new_record(spec: PatchTarget, set_id: str, status: str, reason: str = "") -> PatchRecord:
    return PatchRecord(
        set_id, spec.id, spec.kind, spec.target, spec.required, Status(status), reason, spec.where
    )
