"""The generic patch engine against a fake host library (tests/fixtures/fakelib)."""

from __future__ import annotations

import importlib
import logging
import sys
import threading

import pytest

from flashhead.engine import Kind, PatchEngine, PatchFailure
from flashhead.registry import PatchSpec, Requirement

H = "fakelib.handlers"


def spec(pid: str, target: str, handler: str | None, signature: str | None, **kw) -> PatchSpec:
    kw.setdefault("kind", "wrap")
    return PatchSpec(
        id=pid, target=target, handler=handler, signature=signature, why="t", remove_when="t", **kw
    )


ADD = spec("add", "fakelib.core:add", f"{H}:plus_one", "(a, b=1)")
GREET = spec("greet", "fakelib.core:Base.greet", f"{H}:shout", "(self, name, *, punct='!')")


@pytest.fixture
def core():
    import fakelib.core as core
    import fakelib.handlers as handlers

    originals = dict(vars(core.Base)), core.add, dict(vars(core.Child))
    handlers.CALLS.clear()
    yield core
    # Every test must leave the fake library exactly as it found it.
    assert core.add is originals[1]
    assert dict(vars(core.Base)) == originals[0]
    assert dict(vars(core.Child)) == originals[2]


@pytest.fixture
def lazy_unloaded():
    sys.modules.pop("fakelib.lazy", None)
    if hasattr(sys.modules.get("fakelib"), "lazy"):
        delattr(sys.modules["fakelib"], "lazy")
    yield "fakelib.lazy"
    sys.modules.pop("fakelib.lazy", None)


@pytest.fixture
def engine():
    """A PatchEngine whose patches are undone after the test, also when the test fails."""
    eng = PatchEngine()
    yield eng
    eng.unpatch()


def on() -> bool:
    return True


def calls(name: str) -> int:
    import fakelib.handlers as handlers

    return sum(1 for c in handlers.CALLS if c[0] == name)


# -- apply / unpatch ----------------------------------------------------------------------------


def test_wrap_module_function_and_unpatch(core):
    original = core.add
    engine = PatchEngine()
    [rec] = engine.apply([ADD], set_id="s", enabled=on)
    assert rec.status == "applied", rec.reason
    assert core.add(1, 2) == 4
    assert core.add is not original
    engine.unpatch("s")
    assert core.add is original
    assert core.add(1, 2) == 3
    engine.unpatch("s")  # idempotent
    engine.unpatch()
    assert core.add is original


def test_wrap_method_sees_instance_and_keyword_args(core, engine):
    engine.apply([GREET], set_id="s", enabled=on)
    obj = core.Base()
    assert obj.greet("bob", punct="?") == "HI BOB?"
    import fakelib.handlers as handlers

    _, instance, args, kwargs = handlers.CALLS[-1]
    assert instance is obj and args == ("bob",) and kwargs == {"punct": "?"}
    engine.unpatch()
    assert core.Base().greet("bob") == "hi bob!"


def test_wrap_inherited_method_is_removed_again_on_undo(core):
    engine = PatchEngine()
    child_greet = spec(
        "child", "fakelib.core:Child.greet", f"{H}:shout", "(self, name, *, punct='!')"
    )
    [rec] = engine.apply([child_greet], set_id="s", enabled=on)
    assert rec.status == "applied", rec.reason
    assert core.Child().greet("x") == "HI X!"
    assert core.Base().greet("x") == "hi x!"  # the base class is untouched
    engine.unpatch()
    assert "greet" not in vars(core.Child)


def test_wrap_static_and_class_methods(core, engine):
    twice = spec("twice", "fakelib.core:Base.twice", f"{H}:plus_one", "(x)")
    make = spec("make", "fakelib.core:Base.make", f"{H}:passthrough", "(cls, n=0)")
    records = engine.apply([twice, make], set_id="s", enabled=on)
    assert [r.status for r in records] == ["applied", "applied"], [r.reason for r in records]
    assert core.Base.twice(3) == 7
    assert core.Child.make(2) == ("Child", 2)
    assert calls("passthrough") == 1
    engine.unpatch()
    assert core.Base.twice(3) == 6


def test_reapplying_a_set_does_not_double_wrap(core, engine):
    engine.apply([ADD], set_id="s", enabled=on)
    engine.apply([ADD], set_id="s", enabled=on)
    assert core.add(1, 2) == 4


def test_second_engine_instance_does_not_double_wrap(core):
    first, second = PatchEngine(), PatchEngine()
    first.apply([ADD], set_id="s", enabled=on)
    [rec] = second.apply([ADD], set_id="s", enabled=on)
    assert rec.status == "applied"
    assert core.add(1, 2) == 4
    # The first engine's undo must not tear out the second engine's patch.
    first.unpatch()
    assert core.add(1, 2) == 4
    second.unpatch()
    assert core.add(1, 2) == 3


def test_concurrent_apply_wraps_once(core, engine):
    barrier = threading.Barrier(6)

    def worker():
        barrier.wait()
        engine.apply([ADD], set_id="s", enabled=on)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert core.add(1, 2) == 4


# -- failures at apply time ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, force, fragment",
    [
        ("fakelib.core:nope", False, "has no attribute 'nope'"),
        ("fakelib.core:Base.nope", False, "has no attribute 'nope'"),
        ("fakelib.core:Nope.greet", False, "has no attribute 'Nope'"),
        ("fakelib.does_not_exist:f", True, "cannot import fakelib.does_not_exist"),
    ],
)
def test_missing_target(core, target, force, fragment):
    engine = PatchEngine()
    [rec] = engine.apply(
        [spec("m", target, f"{H}:plus_one", "(a)")], set_id="s", enabled=on, force_import=force
    )
    assert rec.status == "missing-target"
    assert fragment in rec.reason


def test_signature_drift_leaves_target_untouched(core):
    original = core.add
    engine = PatchEngine()
    drifted = spec("add", "fakelib.core:add", f"{H}:plus_one", "(a, b=1, c=None)")
    [rec] = engine.apply([drifted], set_id="s", enabled=on)
    assert rec.status == "signature-mismatch"
    assert "gone: c" in rec.reason and "live (a, b=1)" in rec.reason
    assert core.add is original


def test_signature_default_value_drift(core):
    engine = PatchEngine()
    [rec] = engine.apply(
        [spec("add", "fakelib.core:add", f"{H}:plus_one", "(a, b=2)")], set_id="s", enabled=on
    )
    assert rec.status == "signature-mismatch"
    assert "default declared 2, live 1" in rec.reason


@pytest.mark.parametrize("handler", [f"{H}:missing", "fakelib.no_module:f", f"{H}:NOT_CALLABLE"])
def test_bad_handler(core, handler):
    engine = PatchEngine()
    [rec] = engine.apply(
        [spec("add", "fakelib.core:add", handler, "(a, b=1)")], set_id="s", enabled=on
    )
    assert rec.status == "handler-error"
    assert handler in rec.reason


def test_requires_checked(core):
    engine = PatchEngine()
    ok = spec(
        "a",
        "fakelib.core:add",
        f"{H}:plus_one",
        "(a, b=1)",
        requires=(Requirement("fakelib.core:Base.greet", "(self, name, *, punct='!')"),),
    )
    [rec] = engine.apply([ok], set_id="s", enabled=on)
    assert rec.status == "applied"
    engine.unpatch()
    gone = spec(
        "a",
        "fakelib.core:add",
        f"{H}:plus_one",
        "(a, b=1)",
        requires=(Requirement("fakelib.core:Base.gone"),),
    )
    [rec] = engine.apply([gone], set_id="s", enabled=on)
    assert rec.status == "missing-target" and "requires fakelib.core:Base.gone" in rec.reason
    drift = spec(
        "a",
        "fakelib.core:add",
        f"{H}:plus_one",
        "(a, b=1)",
        requires=(Requirement("fakelib.core:Base.greet", "(self, name)"),),
    )
    [rec] = engine.apply([drift], set_id="s", enabled=on)
    assert rec.status == "signature-mismatch" and "requires" in rec.reason


def test_required_failure_rolls_back_the_set(core):
    engine = PatchEngine()
    bad = spec("bad", "fakelib.core:missing", f"{H}:plus_one", "(a)")
    later = spec("later", "fakelib.core:Base.twice", f"{H}:plus_one", "(x)")
    records = engine.apply([ADD, GREET, bad, later], set_id="s", enabled=on)
    assert [r.status for r in records] == [
        "rolled-back",
        "rolled-back",
        "missing-target",
        "rolled-back",
    ]
    assert all("required patch bad failed" in r.reason for r in records if r.patch_id != "bad")
    assert core.add(1, 2) == 3 and core.Base().greet("x") == "hi x!" and core.Base.twice(2) == 4
    assert not engine.set_active("s")


def test_optional_failure_keeps_the_set(core, engine):
    bad = spec("bad", "fakelib.core:missing", f"{H}:plus_one", "(a)", required=False)
    records = engine.apply([ADD, bad], set_id="s", enabled=on)
    assert [r.status for r in records] == ["applied", "missing-target"]
    assert core.add(1, 2) == 4
    assert engine.set_active("s")


def test_other_sets_survive_a_rollback(core, engine):
    engine.apply([GREET], set_id="always", enabled=on)
    engine.apply(
        [ADD, spec("bad", "fakelib.core:missing", f"{H}:plus_one", "(a)")],
        set_id="main",
        enabled=on,
    )
    assert core.add(1, 2) == 3
    assert core.Base().greet("x") == "HI X!"
    assert engine.set_active("always") and not engine.set_active("main")


# -- run time -----------------------------------------------------------------------------------


def test_handler_raising_falls_back_and_disables(core, caplog, engine):
    [rec] = engine.apply(
        [spec("add", "fakelib.core:add", f"{H}:boom", "(a, b=1)")], set_id="s", enabled=on
    )
    with caplog.at_level(logging.ERROR, logger="flashhead"):
        assert core.add(1, 2) == 3  # the request is not lost
    assert rec.status == "runtime-error" and "RuntimeError: handler bug" in rec.reason
    assert "disabled" in caplog.text
    assert core.add(5) == 6
    assert calls("boom") == 1  # disabled after the first failure


def test_handler_raising_after_calling_original_falls_back(core, engine):
    [rec] = engine.apply(
        [spec("add", "fakelib.core:add", f"{H}:call_then_boom", "(a, b=1)")], set_id="s", enabled=on
    )
    assert core.add(1, 2) == 3
    assert rec.status == "runtime-error"


def test_original_exception_propagates_unchanged(core, engine):
    [rec] = engine.apply(
        [spec("fail", "fakelib.core:fail", f"{H}:passthrough", "(x)")], set_id="s", enabled=on
    )
    with pytest.raises(ValueError, match="original failed: 7") as info:
        core.fail(7)
    assert type(info.value) is ValueError
    assert rec.status == "applied"  # the host's error is not the patch's fault
    with pytest.raises(ValueError):
        core.fail(8)
    assert calls("passthrough") == 2  # still active


def test_kill_switch_at_run_time(core, engine):
    switch = {"on": True}
    engine.apply([ADD], set_id="s", enabled=lambda: switch["on"])
    assert core.add(1) == 3
    switch["on"] = False
    assert core.add(1) == 2
    switch["on"] = True
    assert core.add(1) == 3
    assert calls("plus_one") == 2


def test_broken_kill_switch_means_off(core, engine):
    def broken() -> bool:
        raise RuntimeError("no")

    engine.apply([ADD], set_id="s", enabled=broken)
    assert core.add(1) == 2


# -- lazy targets: post-import hooks ------------------------------------------------------------

LAZY = spec("lazy", "fakelib.lazy:compute", f"{H}:plus_one", "(x, y=2)")


def test_pending_then_applied_on_import(lazy_unloaded):
    engine = PatchEngine()
    [rec] = engine.apply([LAZY], set_id="s", enabled=on)
    assert rec.status == "pending"
    assert "fakelib.lazy" not in sys.modules  # the engine did not import it
    lazy = importlib.import_module("fakelib.lazy")
    assert rec.status == "applied", rec.reason
    assert lazy.compute(3) == 7
    engine.unpatch()
    assert lazy.compute(3) == 6


@pytest.mark.parametrize(
    "order",
    [
        ("import", "patch", "unpatch"),
        ("patch", "import", "unpatch"),
        ("patch", "unpatch", "import"),
        ("patch", "unpatch", "patch", "import", "unpatch"),
        ("import", "patch", "unpatch", "patch", "unpatch"),
    ],
)
def test_import_patch_unpatch_in_any_order(lazy_unloaded, order):
    engine = PatchEngine()
    patched = False
    for step in order:
        if step == "import":
            importlib.import_module("fakelib.lazy")
        elif step == "patch":
            engine.apply([LAZY], set_id="s", enabled=on)
            patched = True
        else:
            engine.unpatch()
            patched = False
    lazy = importlib.import_module("fakelib.lazy")
    assert lazy.compute(3) == (7 if patched else 6)
    [rec] = engine.records() or [None]
    if patched:
        assert rec.status == "applied"
    engine.unpatch()
    assert lazy.compute(3) == 6


def test_force_import_applies_at_once(lazy_unloaded, engine):
    [rec] = engine.apply([LAZY], set_id="s", enabled=on, force_import=True)
    assert rec.status == "applied"
    assert sys.modules["fakelib.lazy"].compute(1) == 3


def test_pending_required_failure_rolls_back_on_import(core, lazy_unloaded):
    engine = PatchEngine()
    drifted = spec("lazy", "fakelib.lazy:compute", f"{H}:plus_one", "(x)")
    records = engine.apply([ADD, drifted], set_id="s", enabled=on)
    assert [r.status for r in records] == ["applied", "pending"]
    assert core.add(1) == 3
    lazy = importlib.import_module("fakelib.lazy")
    assert [r.status for r in records] == ["rolled-back", "signature-mismatch"]
    assert core.add(1) == 2 and lazy.compute(1) == 2
    engine.unpatch()


class _ExplodingKind(Kind):
    name = "explode"

    def apply(self, ctx):
        raise RuntimeError("kind bug")


def test_hook_errors_never_break_the_hosts_import(lazy_unloaded, monkeypatch, caplog):
    engine = PatchEngine(kinds={"explode": _ExplodingKind()})
    [rec] = engine.apply(
        [spec("x", "fakelib.lazy:compute", None, None, kind="explode", required=False)],
        set_id="s",
        enabled=on,
    )
    assert rec.status == "pending"
    lazy = importlib.import_module("fakelib.lazy")
    assert lazy.compute(2) == 4
    assert rec.status == "handler-error" and "kind bug" in rec.reason
    engine.unpatch()

    # Even a failure of the engine itself inside the hook stays out of the import.
    sys.modules.pop("fakelib.lazy", None)
    engine = PatchEngine()
    engine.apply([LAZY], set_id="s", enabled=on)

    def broken(*a, **k):
        raise RuntimeError("engine bug")

    monkeypatch.setattr(engine, "_attempt", broken)
    with caplog.at_level(logging.ERROR, logger="flashhead"):
        lazy = importlib.import_module("fakelib.lazy")
    assert lazy.compute(2) == 4
    assert "post-import hook for lazy failed" in caplog.text
    engine.unpatch()


# -- replace and custom kinds -------------------------------------------------------------------

REPLACE = spec("rep", "fakelib.core:add", f"{H}:replacement", "(a, b=1)", kind="replace")


def test_replace_and_restore(core):
    original = core.add
    engine = PatchEngine()
    [rec] = engine.apply([REPLACE], set_id="s", enabled=on)
    assert rec.status == "applied"
    assert core.add(1) == ("replaced", 2)
    second = PatchEngine()
    second.apply([REPLACE], set_id="s", enabled=on)
    assert core.add(1) == ("replaced", 2)  # not ("replaced", ("replaced", 2))
    second.unpatch()
    engine.unpatch()
    assert core.add is original


def test_kind_failure_status_is_recorded(core):
    class Refuse(Kind):
        name = "refuse"

        def apply(self, ctx):
            raise PatchFailure("missing-target", "no hook on this class")

    engine = PatchEngine(kinds={"refuse": Refuse()})
    [rec] = engine.apply(
        [spec("r", "fakelib.core:Base", None, None, kind="refuse")], set_id="s", enabled=on
    )
    assert rec.status == "missing-target" and rec.reason == "no hook on this class"


def test_unknown_kind_is_a_handler_error(core):
    engine = PatchEngine()
    [rec] = engine.apply(
        [spec("r", "fakelib.core:Base", None, None, kind="register_oot")], set_id="s", enabled=on
    )
    assert rec.status == "handler-error" and "register_oot" in rec.reason


def test_record_skipped_only_accepts_skip_statuses(core):
    engine = PatchEngine()
    rec = engine.record_skipped(ADD, set_id="s", status="skipped-process", reason="worker only")
    assert rec.status == "skipped-process" and engine.records("s") == [rec]
    with pytest.raises(ValueError):
        engine.record_skipped(ADD, set_id="s", status="applied", reason="")
    assert core.add(1) == 2


def test_requires_accepts_declared_instance_fields(core):
    engine = PatchEngine()
    fields = (
        Requirement("fakelib.core:Batch.num_reqs"),
        Requirement("fakelib.core:Batch.req_ids"),
        Requirement("fakelib.core:Annotated.size"),
    )
    [rec] = engine.apply(
        [spec("a", "fakelib.core:add", f"{H}:plus_one", "(a, b=1)", requires=fields)],
        set_id="s",
        enabled=on,
    )
    assert rec.status == "applied", rec.reason
    engine.unpatch()
    gone = (Requirement("fakelib.core:Batch.num_requests"),)
    [rec] = engine.apply(
        [spec("a", "fakelib.core:add", f"{H}:plus_one", "(a, b=1)", requires=gone)],
        set_id="s",
        enabled=on,
    )
    assert rec.status == "missing-target" and "num_requests" in rec.reason
    # A field has no signature: declaring one is a mismatch in what the patch expects.
    called = (Requirement("fakelib.core:Batch.num_reqs", "(self)"),)
    [rec] = engine.apply(
        [spec("a", "fakelib.core:add", f"{H}:plus_one", "(a, b=1)", requires=called)],
        set_id="s",
        enabled=on,
    )
    assert rec.status == "missing-target"


def test_hook_does_not_wait_forever_for_a_busy_engine(lazy_unloaded, monkeypatch):
    import flashhead.engine as engine_mod

    monkeypatch.setattr(engine_mod, "HOOK_LOCK_TIMEOUT_S", 0.2)
    engine = PatchEngine()
    [rec] = engine.apply([LAZY], set_id="s", enabled=on)
    held, release = threading.Event(), threading.Event()

    def hold():
        with engine._lock:
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    try:
        lazy = importlib.import_module("fakelib.lazy")  # must return, unpatched
        assert lazy.compute(3) == 6
        assert rec.status == "pending" and "engine busy" in rec.reason
    finally:
        release.set()
        t.join()
        engine.unpatch()


def test_kinds_must_implement_apply_and_statuses_are_the_documented_names():
    from flashhead.engine import STATUSES, PatchFailure, Status

    class Half(Kind):
        name = "half"

    with pytest.raises(TypeError, match="abstract"):
        Half()
    assert [str(s) for s in STATUSES][:2] == ["applied", "pending"]
    assert PatchFailure("missing-target", "x").status is Status.MISSING_TARGET
    with pytest.raises(ValueError, match="'no-such-status'"):
        PatchFailure("no-such-status", "x")


def test_the_engine_knows_no_patchset_model_and_no_vllm():
    """It reads a small PatchTarget; the YAML model and vLLM are the plugin's business."""
    import ast
    from pathlib import Path

    import flashhead.engine as engine_module

    imported = set()
    for path in Path(engine_module.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith(("flashhead.registry", "vllm"))}
