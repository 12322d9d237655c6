"""Resolving a `module:Qualified.name` target, checking signatures and requirements, and
restoring what a patch replaced."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

from flashhead.engine.contract import PatchFailure, RequiredSymbol
from flashhead.signatures import SignatureSyntaxError, compare, from_callable, parse_signature

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


def restore_attribute(owner: Any, attr: str, installed: Any, previous: Any, own: bool) -> bool:
    """Put `previous` back if `installed` is still what the attribute holds. True if restored."""
    if _namespace(owner).get(attr) is not installed:
        return False
    if own:
        setattr(owner, attr, previous)
    else:
        delattr(owner, attr)
    return True


def import_callable(ref: str) -> Callable[..., Any]:
    module_name, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj


def function_of(raw: Any) -> Any:
    """The function whose parameter list the declared signature describes."""
    if isinstance(raw, (staticmethod, classmethod)):
        return raw.__func__
    if isinstance(raw, property):
        return raw.fget
    return raw


def is_engine_wrapper(obj: Any) -> bool:
    # Look on the type: attribute lookups on a wrapt proxy instance go to the wrapped object.
    return bool(getattr(type(obj), "_flashhead_engine_wrapper", False))


def import_module_of(module_name: str) -> None:
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


def signature_subject(target: Any, raw: Any, member: str | None) -> Any:
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
        return _unwrap_engine(function_of(raw_member))
    if isinstance(target, type):
        return function_of(inspect.getattr_static(target, "__init__"))
    return _unwrap_engine(function_of(raw))


def _unwrap_engine(obj: Any) -> Any:
    while is_engine_wrapper(obj):
        obj = obj.__wrapped__
    return function_of(obj)


def check_signature(target: str, declared_text: str, live_obj: Any) -> None:
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


def check_requirement(req: RequiredSymbol) -> None:
    import_module_of(req.module)
    try:
        owner, attr, raw, _own = resolve_static(req.target)
    except PatchFailure as exc:
        if req.signature is None and _is_declared_field(req.target):
            return  # an instance field declared on the class: it exists, nothing to call
        raise PatchFailure("missing-target", f"requires {req.target}: {exc.reason}") from None
    if req.signature is not None:
        target = getattr(owner, attr)
        try:
            check_signature(req.target, req.signature, signature_subject(target, raw, None))
        except PatchFailure as exc:
            raise PatchFailure(exc.status, f"requires {exc.reason}") from None
