"""The two built-in kinds: `wrap` (a wrapt FunctionWrapper around the target) and `replace`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import wrapt

from flashhead.engine.contract import ApplyContext, Kind, PatchFailure, Undo
from flashhead.engine.targets import function_of, is_engine_wrapper, restore_attribute

logger = logging.getLogger("flashhead")


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
        if is_engine_wrapper(raw) and getattr(raw, "_self_patch_key", None) == ctx.patch_key:
            # Left by an earlier engine instance (or a previous register()): wrap its original.
            raw = raw.__wrapped__
        if not callable(function_of(raw)):
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
            if not restore_attribute(owner, attr, wrapper, previous, own):
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
            restore_attribute(owner, attr, new, previous, own)

        return undo
