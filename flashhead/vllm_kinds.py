"""The two vLLM-specific patch kinds, plugged into the generic engine by the plugin.

- ``register_oot``: replace a registered vLLM layer class (CustomOp 0.10.2-0.19, PluggableLayer
  0.20+) through its out-of-tree hook ``register_oot(_decorated_..._cls=None, name=None)``. The
  handler is a factory ``(base_cls, spec) -> subclass``; vLLM then builds the subclass wherever
  the model asks for the base class. Undo removes it from the OOT registry dict
  (``CustomOp.op_registry_oot`` up to 0.14, module-level ``op_registry_oot`` in
  vllm/model_executor/custom_op.py later).
- ``register_architecture``: for each ``NewArch: BaseArch`` pair whose base the release knows,
  register ``NewArch`` to the same (lazy) model class as ``BaseArch``. Missing bases are recorded,
  not errors. Undo removes the new names.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from flashhead.engine import ApplyContext, Kind, PatchFailure, Undo

__all__ = ["RegisterArchitectureKind", "RegisterOotKind", "find_oot_registry", "vllm_kinds"]

logger = logging.getLogger("flashhead")


def find_oot_registry(base_cls: type) -> dict[str, type] | None:
    """The dict vLLM's ``register_oot`` writes to for `base_cls`, or None if not found."""
    on_class = getattr(base_cls, "op_registry_oot", None)
    if isinstance(on_class, dict):
        return on_class
    try:
        hook = inspect.getattr_static(base_cls, "register_oot")
    except AttributeError:
        return None
    func = getattr(hook, "__func__", hook)
    registry = getattr(func, "__globals__", {}).get("op_registry_oot")
    return registry if isinstance(registry, dict) else None


class RegisterOotKind(Kind):
    name = "register_oot"

    def apply(self, ctx: ApplyContext) -> Undo:
        base = ctx.target
        if not isinstance(base, type):
            raise PatchFailure("missing-target", f"{ctx.spec.target} is not a class")
        if not callable(getattr(base, "register_oot", None)):
            raise PatchFailure(
                "missing-target",
                f"{base.__name__} has no register_oot hook (not a CustomOp/PluggableLayer in this release)",
            )
        registry = find_oot_registry(base)
        if registry is None:
            raise PatchFailure(
                "missing-target", f"cannot find the out-of-tree registry of {base.__name__}"
            )
        name = base.__name__
        current = registry.get(name)
        if current is not None:
            if getattr(current, "__flashhead_patch_key__", None) == ctx.patch_key:
                del registry[name]  # ours, from an earlier register() or engine instance
            else:
                raise PatchFailure(
                    "handler-error",
                    f"{name} already has an out-of-tree replacement {current.__module__}.{current.__qualname__} "
                    "(another plugin?); refusing to override it",
                )
        assert ctx.handler is not None
        sub = ctx.handler(base, ctx.spec)
        if not (isinstance(sub, type) and issubclass(sub, base)):
            raise PatchFailure(
                "handler-error", f"{ctx.spec.handler} returned {sub!r}, not a subclass of {name}"
            )
        sub.__flashhead_patch_key__ = ctx.patch_key
        base.register_oot(sub, name=name)
        if registry.get(name) is not sub:
            raise PatchFailure(
                "handler-error", f"{name}.register_oot did not register {sub.__qualname__}"
            )

        def undo() -> None:
            if registry.get(name) is sub:
                del registry[name]

        return undo


def _same_model_ref(registry: Any, base: str) -> Any:
    """What to register a new name with so that it loads exactly like `base`."""
    entry = registry.models[base]
    module_name = getattr(entry, "module_name", None)
    class_name = getattr(entry, "class_name", None)
    if isinstance(module_name, str) and isinstance(class_name, str):
        return f"{module_name}:{class_name}"
    model_cls = getattr(entry, "model_cls", None)
    if isinstance(model_cls, type):
        return model_cls
    return None


class RegisterArchitectureKind(Kind):
    name = "register_architecture"
    # Every vLLM plugin fills ModelRegistry at load time; vLLM reads it before the worker runs.
    eager_import = True

    def apply(self, ctx: ApplyContext) -> Undo:
        registry = ctx.target
        for needed in ("register_model", "get_supported_archs", "models"):
            if not hasattr(registry, needed):
                raise PatchFailure("missing-target", f"{ctx.spec.target} has no {needed}")
        supported = set(registry.get_supported_archs())
        installed: dict[str, tuple[Any, Any]] = {}  # new -> (entry we put, entry before)
        missing: dict[str, str] = {}

        def undo() -> None:
            for new, (ours, before) in installed.items():
                if registry.models.get(new) is ours:
                    if before is None:
                        registry.models.pop(new, None)
                    else:
                        registry.models[new] = before

        try:
            # A vLLM-only field of the patchset model (registry.PatchSpec): the engine's
            # PatchTarget does not carry it.
            architectures = getattr(ctx.spec, "architectures", {})
            for new, base in architectures.items():
                if base not in supported:
                    missing[new] = base
                    continue
                ref = _same_model_ref(registry, base)
                before = registry.models.get(new)
                if ref is None:
                    registry.models[new] = registry.models[base]
                else:
                    registry.register_model(new, ref)
                if before is not None and _describes(before) == _describes(registry.models[new]):
                    before = None  # our own earlier registration: undo removes the name
                installed[new] = (registry.models[new], before)
        except Exception:
            undo()
            raise
        ctx.record.details["registered"] = sorted(installed)
        ctx.record.details["missing_bases"] = dict(missing)
        if missing:
            logger.debug("flashhead: architectures without a base in this vLLM: %s", missing)
        return undo


def _describes(entry: Any) -> tuple[Any, ...]:
    return (
        getattr(entry, "module_name", None),
        getattr(entry, "class_name", None),
        getattr(entry, "model_cls", None),
    )


def vllm_kinds() -> dict[str, Kind]:
    return {"register_oot": RegisterOotKind(), "register_architecture": RegisterArchitectureKind()}
