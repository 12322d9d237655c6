"""Parameter lists: parse, read live (inspect) and from source (ast), compare."""

from __future__ import annotations

import ast
import enum
import functools

import pytest

from flashhead.signatures import (
    NOT_LITERAL,
    ParamKind,
    SignatureSyntaxError,
    compare,
    from_ast,
    from_callable,
    parse_signature,
)

ALL_KINDS = "(self, a, /, b, c=None, *args, d, e=1, **kw)"


def test_parse_every_kind():
    p = parse_signature(ALL_KINDS)
    assert [(x.name, x.kind, x.has_default) for x in p.params] == [
        ("self", ParamKind.POSITIONAL_ONLY, False),
        ("a", ParamKind.POSITIONAL_ONLY, False),
        ("b", ParamKind.POSITIONAL_OR_KEYWORD, False),
        ("c", ParamKind.POSITIONAL_OR_KEYWORD, True),
        ("args", ParamKind.VAR_POSITIONAL, False),
        ("d", ParamKind.KEYWORD_ONLY, False),
        ("e", ParamKind.KEYWORD_ONLY, True),
        ("kw", ParamKind.VAR_KEYWORD, False),
    ]
    assert p.render() == ALL_KINDS


@pytest.mark.parametrize(
    "text",
    ["()", "(self)", "(x, *, y=1)", "(a, /)", "(*args, **kwargs)", "(x='raw_logprobs', y=(1, 2))"],
)
def test_render_round_trips(text):
    assert parse_signature(text).render() == text


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("self, x", "write it in parentheses"),
        ("(self, x", "write it in parentheses"),
        ("(self, x x)", "not a valid Python parameter list"),
        ("(self, x: int)", "has type annotations"),
        ("(self) -> None", "write it in parentheses"),
        ("(x=1, y)", "not a valid Python parameter list"),
        (42, "expected a string"),
    ],
)
def test_parse_errors(text, fragment):
    with pytest.raises(SignatureSyntaxError, match=fragment):
        parse_signature(text)


def test_live_matches_declared_for_the_same_text():
    def f(self, a, /, b, c=None, *args, d, e=1, **kw):
        pass

    assert compare(parse_signature(ALL_KINDS), from_callable(f)) == []


def test_ast_and_live_agree():
    src = "def f(self, a, /, b, c=None, *args, d, e=1, **kw):\n    pass\n"
    func = ast.parse(src).body[0]
    ns: dict = {}
    exec(src, ns)
    assert from_ast(func) == from_callable(ns["f"])


@pytest.mark.parametrize(
    "declared, live_src, fragment",
    [
        ("(self, x)", "def f(self, x, y): pass", "new: y"),
        ("(self, x, y)", "def f(self, x): pass", "gone: y"),
        ("(self, y, x)", "def f(self, x, y): pass", "same names, different order"),
        (
            "(self, x, *, y)",
            "def f(self, x, y): pass",
            "y: declared keyword-only, live positional-or-keyword",
        ),
        (
            "(self, x, y)",
            "def f(self, x, y=None): pass",
            "y: live has a default (None), declared none",
        ),
        (
            "(self, x, y=None)",
            "def f(self, x, y): pass",
            "y: declared with a default, live has none",
        ),
        ("(self, x=False)", "def f(self, x=True): pass", "x: default declared False, live True"),
        ("(self, x=False)", "def f(self, x=0): pass", "x: default declared False, live 0"),
        ("(self, *args)", "def f(self, *rest): pass", "gone: args"),
    ],
)
def test_compare_reports_drift(declared, live_src, fragment):
    ns: dict = {}
    exec(live_src, ns)
    problems = compare(parse_signature(declared), from_callable(ns["f"]))
    assert any(fragment in p for p in problems), problems


class Mode(str, enum.Enum):
    RAW = "raw_logprobs"


_SENTINEL = object()


def test_non_literal_defaults_are_not_compared():
    def f(self, mode=Mode.RAW, marker=_SENTINEL, device=None):
        pass

    live = from_callable(f)
    assert live.params[1].default is NOT_LITERAL and live.params[2].default is NOT_LITERAL
    # Presence of a default still counts; the values are unknowable on one side.
    assert (
        compare(
            parse_signature("(self, mode=LogprobsMode.RAW, marker=object(), device=None)"), live
        )
        == []
    )
    assert (
        compare(parse_signature("(self, mode='raw_logprobs', marker=None, device=None)"), live)
        == []
    )


def test_from_callable_follows_wraps_and_unwraps_descriptors():
    def inner(self, x, y=2):
        pass

    @functools.wraps(inner)
    def outer(*args, **kwargs):
        return inner(*args, **kwargs)

    assert from_callable(outer).render() == "(self, x, y=2)"

    class C:
        @staticmethod
        def s(a, b=1):
            pass

        @classmethod
        def c(cls, a):
            pass

    assert from_callable(C.__dict__["s"]).render() == "(a, b=1)"
    assert from_callable(C.__dict__["c"]).render() == "(cls, a)"


def test_tuple_defaults_compare_elementwise():
    def f(x=(1, 2)):
        pass

    assert compare(parse_signature("(x=(1, 2))"), from_callable(f)) == []
    assert compare(parse_signature("(x=(1, 3))"), from_callable(f)) != []
