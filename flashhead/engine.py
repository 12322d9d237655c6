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

import importlib
import inspect
import logging
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import wrapt

from flashhead.signatures import SignatureSyntaxError, compare, from_callable, parse_signature

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


class RequiredSymbol(Protocol):
    """Another symbol a handler relies on; checked like the target (exists, signature)."""

    @property
    def target(self) -> str: ...  # module:Qualified.name
    @property
    def module(self) -> str: ...
    @property
    def signature(self) -> str | None: ...


class PatchTarget(Protocol):
    """What the engine reads of a patch. The patchset model (`registry.PatchSpec`) is one; its
    vLLM-only fields (process, always, architectures) are the plugin's and the vLLM kinds'."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def target(self) -> str: ...  # module:Qualified.name
    @property
    def module(self) -> str: ...
    @property
    def handler(self) -> str | None: ...
    @property
    def signature(self) -> str | None: ...
    @property
    def signature_of(self) -> str | None: ...
    @property
    def requires(self) -> Sequence[RequiredSymbol]: ...
    @property
    def required(self) -> bool: ...
    @property
    def where(self) -> str: ...  # file:line for messages


class Status(str, Enum):
    """A patch's state. A ``str`` so that records compare with, and serialise as, the names the
    doctor and the YAML docs use ("applied", "skipped-version", ...)."""

    APPLIED = "applied"
    PENDING = "pending"
    SKIPPED_VERSION = "skipped-version"
    SKIPPED_PROCESS = "skipped-process"
    MISSING_TARGET = "missing-target"
    SIGNATURE_MISMATCH = "signature-mismatch"
    HANDLER_ERROR = "handler-error"
    DISABLED = "disabled"
    ROLLED_BACK = "rolled-back"
    RUNTIME_ERROR = "runtime-error"

    def __str__(self) -> str:  # the name in f-strings and format() on every Python
        return self.value

    __format__ = str.__format__


STATUSES = tuple(Status)
SKIPPED_STATUSES = (Status.SKIPPED_VERSION, Status.SKIPPED_PROCESS, Status.DISABLED)
FAILED_STATUSES = (
    Status.MISSING_TARGET,
    Status.SIGNATURE_MISMATCH,
    Status.HANDLER_ERROR,
    Status.ROLLED_BACK,
    Status.RUNTIME_ERROR,
)

# Statuses a rollback turns into `rolled-back` (the rest already say why the patch is not live).
_ROLLED_BACK_FROM = (Status.APPLIED, Status.PENDING, Status.RUNTIME_ERROR)

Undo = Callable[[], None]
HOOK_LOCK_TIMEOUT_S = 30.0


@dataclass
class PatchRecord:
    set_id: str
    patch_id: str
    kind: str
    target: str
    required: bool
    status: Status
    reason: str = ""
    source: str = ""
    # Kind-specific facts (e.g. registered / missing architectures).
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_id,
            "id": self.patch_id,
            "kind": self.kind,
            "target": self.target,
            "required": self.required,
            "status": self.status,
            "reason": self.reason,
            "source": self.source,
            "details": dict(self.details),
        }


class PatchFailure(Exception):
    """Raised by a kind (or the engine) to fail a patch with a given status."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = Status(status)
        self.reason = reason


@dataclass
class ApplyContext:
    """Everything a kind needs to install one patch."""

    spec: PatchTarget
    owner: Any  # the module or class holding the attribute
    attr: str
    raw: Any  # the attribute as stored (function, staticmethod, class, ...), maybe inherited
    own: bool  # whether `attr` is in owner's own __dict__ (else inherited: undo deletes)
    target: Any  # getattr(owner, attr)
    handler: Callable[..., Any] | None
    # True while the patch should act (set active, patch not disabled, host kill switch on).
    enabled: Callable[[], bool]
    # The wrap kind calls this when the handler raised at run time.
    on_runtime_error: Callable[[BaseException], None]
    record: PatchRecord
    patch_key: str


class Kind(ABC):
    """A way of installing a patch. ``apply`` returns the undo; raise PatchFailure to fail."""

    name = ""
    # Import the target module at once instead of waiting for the host to import it
    # (e.g. a registry that must be filled before the host looks things up).
    eager_import = False

    @abstractmethod
    def apply(self, ctx: ApplyContext) -> Undo:
        """Install the patch described by ``ctx``; return what undoes it."""


# --------------------------------------------------------------------------------------------
# Attribute helpers


def _namespace(owner: Any) -> Mapping[str, Any]:
    try:
        return vars(owner)
    except TypeError:
        return {}


def resolve_static(target: str) -> tuple[Any, str, Any, bool]:
    """(owner, attr, raw value, own) for an already imported ``module:Qual.name``.

    Raises PatchFailure(missing-target) when the module is not imported or a name is missing.
    """
    module_name, _, qualname = target.partition(":")
    module = sys.modules.get(module_name)
    if module is None:
        raise PatchFailure("missing-target", f"module {module_name} is not imported")
    parts = qualname.split(".")
    owner: Any = module
    for i, part in enumerate(parts[:-1]):
        try:
            owner = getattr(owner, part)
        except AttributeError:
            where = ".".join([module_name, *parts[:i]])
            raise PatchFailure("missing-target", f"{where} has no attribute {part!r}") from None
    attr = parts[-1]
    try:
        raw = inspect.getattr_static(owner, attr)
    except AttributeError:
        where = ":".join([module_name, ".".join(parts[:-1])]) if len(parts) > 1 else module_name
        raise PatchFailure("missing-target", f"{where} has no attribute {attr!r}") from None
    own = attr in _namespace(owner)
    return owner, attr, raw, own


def _restore(owner: Any, attr: str, installed: Any, previous: Any, own: bool) -> bool:
    """Put `previous` back if `installed` is still what the attribute holds. True if restored."""
    if _namespace(owner).get(attr) is not installed:
        return False
    if own:
        setattr(owner, attr, previous)
    else:
        delattr(owner, attr)
    return True


def _import_callable(ref: str) -> Callable[..., Any]:
    module_name, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj


def _function_of(raw: Any) -> Any:
    """The function whose parameter list the declared signature describes."""
    if isinstance(raw, (staticmethod, classmethod)):
        return raw.__func__
    if isinstance(raw, property):
        return raw.fget
    return raw


def _is_engine_wrapper(obj: Any) -> bool:
    # Look on the type: attribute lookups on a wrapt proxy instance go to the wrapped object.
    return bool(getattr(type(obj), "_flashhead_engine_wrapper", False))


# --------------------------------------------------------------------------------------------
# Built-in kinds


class _PatchWrapper(wrapt.FunctionWrapper):
    _flashhead_engine_wrapper = True

    def __init__(self, wrapped: Any, wrapper: Any, enabled: Any, key: str):
        super().__init__(wrapped, wrapper, enabled=enabled)
        self._self_patch_key = key


class _OriginalCall:
    """Calls the original and remembers what it raised, to tell its errors from the handler's."""

    __slots__ = ("__wrapped__", "raised")

    def __init__(self, wrapped: Callable[..., Any]):
        self.__wrapped__ = wrapped
        self.raised: BaseException | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.__wrapped__(*args, **kwargs)
        except BaseException as exc:
            self.raised = exc
            raise


class WrapKind(Kind):
    """``handler(wrapped, instance, args, kwargs)`` around the target (a wrapt FunctionWrapper)."""

    name = "wrap"

    def apply(self, ctx: ApplyContext) -> Undo:
        raw = ctx.raw
        if _is_engine_wrapper(raw) and getattr(raw, "_self_patch_key", None) == ctx.patch_key:
            # Left by an earlier engine instance (or a previous register()): wrap its original.
            raw = raw.__wrapped__
        if not callable(_function_of(raw)):
            raise PatchFailure("missing-target", f"{ctx.spec.target} is not callable")
        handler = ctx.handler
        assert handler is not None
        on_error = ctx.on_runtime_error

        def guarded(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
            call = _OriginalCall(wrapped)
            try:
                return handler(call, instance, args, kwargs)
            except BaseException as exc:
                if call.raised is not None and exc is call.raised:
                    raise  # the original's own error: the host sees it unchanged
                if not isinstance(exc, Exception):
                    raise  # KeyboardInterrupt, SystemExit: not ours to swallow
                on_error(exc)
            return wrapped(*args, **kwargs)

        wrapper = _PatchWrapper(raw, guarded, ctx.enabled, ctx.patch_key)
        setattr(ctx.owner, ctx.attr, wrapper)
        owner, attr, own, previous = ctx.owner, ctx.attr, ctx.own, raw

        def undo() -> None:
            if not _restore(owner, attr, wrapper, previous, own):
                logger.debug("flashhead: %s was re-patched by someone else; left in place", attr)

        return undo


class ReplaceKind(Kind):
    """``handler(original, spec) -> new``; the attribute is set to ``new``."""

    name = "replace"

    def apply(self, ctx: ApplyContext) -> Undo:
        raw = ctx.raw
        if getattr(raw, "__flashhead_patch_key__", None) == ctx.patch_key:
            raw = raw.__flashhead_original__
        assert ctx.handler is not None
        new = ctx.handler(raw, ctx.spec)
        try:
            new.__flashhead_patch_key__ = ctx.patch_key
            new.__flashhead_original__ = raw
        except (AttributeError, TypeError):
            pass  # builtins / slotted objects: idempotence then relies on this engine's undo
        setattr(ctx.owner, ctx.attr, new)
        owner, attr, own, previous = ctx.owner, ctx.attr, ctx.own, raw

        def undo() -> None:
            _restore(owner, attr, new, previous, own)

        return undo


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
        _import(spec.module)
        owner, attr, raw, own = resolve_static(spec.target)
        target = getattr(owner, attr)
        if spec.signature is not None:
            _check_signature(
                spec.target, spec.signature, _signature_subject(target, raw, spec.signature_of)
            )
        for req in spec.requires:
            _check_requirement(req)
        handler = None
        if spec.handler is not None:
            try:
                handler = _import_callable(spec.handler)
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


def _import(module_name: str) -> None:
    if module_name in sys.modules:
        return
    try:
        importlib.import_module(module_name)
    except ImportError as exc:
        raise PatchFailure("missing-target", f"cannot import {module_name}: {exc}") from None
    except Exception as exc:
        raise PatchFailure(
            "missing-target", f"importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from None


def _signature_subject(target: Any, raw: Any, member: str | None) -> Any:
    """What the declared signature describes: a member, a class's __init__, or the target."""
    if member is not None:
        obj = target
        for part in member.split("."):
            try:
                raw_member = inspect.getattr_static(obj, part)
            except AttributeError:
                raise PatchFailure(
                    "missing-target", f"{target!r} has no member {member!r}"
                ) from None
            obj = getattr(obj, part)
        return _unwrap_engine(_function_of(raw_member))
    if isinstance(target, type):
        return _function_of(inspect.getattr_static(target, "__init__"))
    return _unwrap_engine(_function_of(raw))


def _unwrap_engine(obj: Any) -> Any:
    while _is_engine_wrapper(obj):
        obj = obj.__wrapped__
    return _function_of(obj)


def _check_signature(target: str, declared_text: str, live_obj: Any) -> None:
    try:
        declared = parse_signature(declared_text)
    except SignatureSyntaxError as exc:
        raise PatchFailure("signature-mismatch", f"declared signature is invalid: {exc}") from None
    try:
        live = from_callable(live_obj)
    except (TypeError, ValueError) as exc:
        raise PatchFailure(
            "signature-mismatch", f"cannot read the live signature of {target}: {exc}"
        ) from None
    problems = compare(declared, live)
    if problems:
        raise PatchFailure(
            "signature-mismatch",
            f"{target}: declared {declared.render()}, live {live.render()}: {'; '.join(problems)}",
        )


def _is_declared_field(target: str) -> bool:
    """``Class.name`` is an annotated field without a class-level value (dataclass fields)."""
    module_name, _, qualname = target.partition(":")
    owner_path, _, attr = qualname.rpartition(".")
    if not owner_path:
        return False
    obj: Any = sys.modules.get(module_name)
    for part in owner_path.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        return False
    if attr in getattr(obj, "__dataclass_fields__", {}):
        return True
    return any(attr in vars(klass).get("__annotations__", {}) for klass in obj.__mro__)


def _check_requirement(req: RequiredSymbol) -> None:
    _import(req.module)
    try:
        owner, attr, raw, _own = resolve_static(req.target)
    except PatchFailure as exc:
        if req.signature is None and _is_declared_field(req.target):
            return  # an instance field declared on the class: it exists, nothing to call
        raise PatchFailure("missing-target", f"requires {req.target}: {exc.reason}") from None
    if req.signature is not None:
        target = getattr(owner, attr)
        try:
            _check_signature(req.target, req.signature, _signature_subject(target, raw, None))
        except PatchFailure as exc:
            raise PatchFailure(exc.status, f"requires {exc.reason}") from None
