"""Parameter lists: one model shared by the live check (``inspect``) and the static check (``ast``).

A patch declares the signature it was written against as a Python parameter list without
annotations, e.g. ``"(self, lm_head, hidden_states, embedding_bias=None, *, k=1, **kw)"``.
The engine compares it with the live callable; the static checker compares it with a function
definition read from a vLLM source tree. Both go through :func:`compare`, so a YAML file that
passes one check means the same thing to the other.

Comparison rules (docs/DESIGN.md): names, order, kinds (``/``, ``*``, ``*args``, ``**kwargs``) and
which parameters have defaults must match; default *values* are compared only when both sides are
literals (a live default such as an enum member or a sentinel object is not a literal).
"""

from __future__ import annotations

import ast
import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NOT_LITERAL",
    "Param",
    "ParamKind",
    "ParamList",
    "SignatureSyntaxError",
    "compare",
    "from_ast",
    "from_callable",
    "parse_signature",
]


class SignatureSyntaxError(ValueError):
    """A declared signature is not a valid annotation-free Python parameter list."""


class ParamKind(enum.Enum):
    POSITIONAL_ONLY = "positional-only"
    POSITIONAL_OR_KEYWORD = "positional-or-keyword"
    VAR_POSITIONAL = "*args"
    KEYWORD_ONLY = "keyword-only"
    VAR_KEYWORD = "**kwargs"


class _NotLiteral:
    """Marker for a default whose value cannot be compared (not a Python literal)."""

    _instance: _NotLiteral | None = None

    def __new__(cls) -> _NotLiteral:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<not a literal>"


NOT_LITERAL: Any = _NotLiteral()

_LITERAL_TYPES = (type(None), bool, int, float, complex, str, bytes)

_INSPECT_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: ParamKind.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: ParamKind.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.VAR_POSITIONAL: ParamKind.VAR_POSITIONAL,
    inspect.Parameter.KEYWORD_ONLY: ParamKind.KEYWORD_ONLY,
    inspect.Parameter.VAR_KEYWORD: ParamKind.VAR_KEYWORD,
}


@dataclass(frozen=True)
class Param:
    name: str
    kind: ParamKind
    has_default: bool = False
    # The default's value when it is a literal, else NOT_LITERAL (also when there is no default).
    default: Any = NOT_LITERAL
    # How the default was written (for messages); "" when there is no default.
    default_text: str = ""

    def render(self) -> str:
        if self.kind is ParamKind.VAR_POSITIONAL:
            return f"*{self.name}"
        if self.kind is ParamKind.VAR_KEYWORD:
            return f"**{self.name}"
        if self.has_default:
            return f"{self.name}={self.default_text or '...'}"
        return self.name


@dataclass(frozen=True)
class ParamList:
    params: tuple[Param, ...]

    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def render(self) -> str:
        """Canonical one-line rendering, in the same form the YAML uses."""
        parts: list[str] = []
        saw_kwonly_marker = False
        for i, p in enumerate(self.params):
            if p.kind is ParamKind.KEYWORD_ONLY and not saw_kwonly_marker:
                if not any(q.kind is ParamKind.VAR_POSITIONAL for q in self.params[:i]):
                    parts.append("*")
                saw_kwonly_marker = True
            parts.append(p.render())
            is_last_posonly = p.kind is ParamKind.POSITIONAL_ONLY and (
                i + 1 == len(self.params)
                or self.params[i + 1].kind is not ParamKind.POSITIONAL_ONLY
            )
            if is_last_posonly:
                parts.append("/")
        return "(" + ", ".join(parts) + ")"

    def __str__(self) -> str:
        return self.render()


def _literal_value(value: Any) -> Any:
    """`value` if it is a literal we can compare, else NOT_LITERAL."""
    # Enum members subclass int/str but are not literals in source.
    if isinstance(value, enum.Enum):
        return NOT_LITERAL
    if type(value) in _LITERAL_TYPES:
        return value
    if type(value) in (tuple, frozenset):
        items = [_literal_value(v) for v in value]
        if any(v is NOT_LITERAL for v in items):
            return NOT_LITERAL
        return type(value)(items)
    return NOT_LITERAL


def _ast_default(node: ast.expr) -> tuple[Any, str]:
    text = ast.unparse(node)
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NOT_LITERAL, text
    # list/dict/set literals are mutable defaults; compare them anyway through a frozen form.
    if isinstance(value, list):
        value = tuple(value)
    return _literal_value(value), text


def from_ast(func: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> ParamList:
    """The parameter list of a function definition read from source."""
    a = func.args
    params: list[Param] = []
    positional = list(a.posonlyargs) + list(a.args)
    n_no_default = len(positional) - len(a.defaults)
    for i, arg in enumerate(positional):
        kind = (
            ParamKind.POSITIONAL_ONLY if i < len(a.posonlyargs) else ParamKind.POSITIONAL_OR_KEYWORD
        )
        if i >= n_no_default:
            value, text = _ast_default(a.defaults[i - n_no_default])
            params.append(Param(arg.arg, kind, True, value, text))
        else:
            params.append(Param(arg.arg, kind))
    if a.vararg is not None:
        params.append(Param(a.vararg.arg, ParamKind.VAR_POSITIONAL))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        if default is None:
            params.append(Param(arg.arg, ParamKind.KEYWORD_ONLY))
        else:
            value, text = _ast_default(default)
            params.append(Param(arg.arg, ParamKind.KEYWORD_ONLY, True, value, text))
    if a.kwarg is not None:
        params.append(Param(a.kwarg.arg, ParamKind.VAR_KEYWORD))
    return ParamList(tuple(params))


def _has_annotations(func: ast.FunctionDef) -> bool:
    a = func.args
    every = list(a.posonlyargs) + list(a.args) + list(a.kwonlyargs)
    every += [x for x in (a.vararg, a.kwarg) if x is not None]
    return func.returns is not None or any(arg.annotation is not None for arg in every)


def parse_signature(text: str) -> ParamList:
    """Parse a declared signature such as ``"(self, x, y=None, *, z=1)"``.

    Raises SignatureSyntaxError with a message that says what to write instead.
    """
    if not isinstance(text, str):
        raise SignatureSyntaxError(
            f"expected a string like '(self, x, y=None)', got {type(text).__name__}"
        )
    stripped = text.strip()
    if not (stripped.startswith("(") and stripped.endswith(")")):
        raise SignatureSyntaxError(
            f"{text!r} is not a parameter list; write it in parentheses like '(self, x, y=None)'"
        )
    try:
        module = ast.parse(f"def _f{stripped}:\n    pass\n", mode="exec")
    except SyntaxError as exc:
        raise SignatureSyntaxError(
            f"{text!r} is not a valid Python parameter list ({exc.msg}); "
            "write it like '(self, x, y=None, *, z=1, **kwargs)'"
        ) from None
    func = module.body[0]
    assert isinstance(func, ast.FunctionDef)
    if _has_annotations(func):
        raise SignatureSyntaxError(
            f"{text!r} has type annotations; write the parameter list without annotations "
            "(annotations are not compared)"
        )
    return from_ast(func)


def from_callable(obj: Callable[..., Any] | Any) -> ParamList:
    """The live parameter list of a function, following ``__wrapped__`` (functools.wraps, wrapt).

    Pass the raw function (``Class.__dict__['method']`` unwrapped from staticmethod/classmethod)
    to keep ``self`` / ``cls``; a bound method has them removed by inspect.
    """
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    sig = inspect.signature(obj, follow_wrapped=True)
    params: list[Param] = []
    for p in sig.parameters.values():
        kind = _INSPECT_KINDS[p.kind]
        if p.default is inspect.Parameter.empty:
            params.append(Param(p.name, kind))
        else:
            params.append(Param(p.name, kind, True, _literal_value(p.default), repr(p.default)))
    return ParamList(tuple(params))


def compare(declared: ParamList, live: ParamList) -> list[str]:
    """Differences between a declared and a live parameter list; empty when they match."""
    problems: list[str] = []
    d_names, l_names = declared.names(), live.names()
    if d_names != l_names:
        missing = [n for n in d_names if n not in l_names]
        extra = [n for n in l_names if n not in d_names]
        detail = []
        if missing:
            detail.append(f"gone: {', '.join(missing)}")
        if extra:
            detail.append(f"new: {', '.join(extra)}")
        if not missing and not extra:
            detail.append("same names, different order")
        problems.append(f"parameters differ ({'; '.join(detail)})")
        return problems
    for d, lv in zip(declared.params, live.params):
        if d.kind is not lv.kind:
            problems.append(f"{d.name}: declared {d.kind.value}, live {lv.kind.value}")
        if d.has_default != lv.has_default:
            if d.has_default:
                problems.append(f"{d.name}: declared with a default, live has none")
            else:
                problems.append(f"{d.name}: live has a default ({lv.default_text}), declared none")
        elif d.has_default and d.default is not NOT_LITERAL and lv.default is not NOT_LITERAL:
            if not _same_literal(d.default, lv.default):
                problems.append(
                    f"{d.name}: default declared {d.default_text}, live {lv.default_text}"
                )
    return problems


def _same_literal(a: Any, b: Any) -> bool:
    # True == 1 in Python; a default changed from False to 0 is still a change.
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same_literal(x, y) for x, y in zip(a, b))
    return a == b
