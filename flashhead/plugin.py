"""Per-process activation: detect vLLM, pick the patchset, run the engine, log one line.

vLLM calls :func:`register` (through ``flashhead.register``) once in every process it starts.
``register`` is idempotent and never raises; :func:`activate` is the same logic on an engine the
caller owns (``flashhead doctor`` uses it to tell the truth about what ``vllm serve`` would do).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashhead import __version__
from flashhead.compat.process import ProcessInfo, current_process, hosts
from flashhead.compat.version import VersionInfo, detect_vllm_version
from flashhead.engine import FAILED_STATUSES, SKIPPED_STATUSES, PatchEngine, PatchRecord
from flashhead.registry import (
    LoadResult,
    PatchSet,
    check_ranges,
    load_patchsets,
    patchset_dir,
    select_patchset,
)
from flashhead.settings import settings

__all__ = ["Activation", "activate", "register"]

logger = logging.getLogger("flashhead")

_register_lock = threading.Lock()
_registered = False


@dataclass
class Activation:
    flashhead_version: str
    vllm: VersionInfo
    process: ProcessInfo
    # FLASHHEAD_ENABLED (unset = on) and the patchset allows serving FlashHead.
    flashhead_enabled: bool
    env_enabled: bool
    patchset_dir: Path
    patchset: PatchSet | None = None
    # Why no patchset was chosen, or why FlashHead patches are off; "" when all is well.
    note: str = ""
    # Problems found in the patchset files (file:line: field: problem (fix)), and range checks.
    problems: list[str] = field(default_factory=list)
    always_set: str | None = None
    main_set: str | None = None
    records: list[PatchRecord] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        out = {"applied": 0, "pending": 0, "skipped": 0, "failed": 0}
        for r in self.records:
            if r.status in ("applied", "pending"):
                out[r.status] += 1
            elif r.status in SKIPPED_STATUSES:
                out["skipped"] += 1
            elif r.status in FAILED_STATUSES:
                out["failed"] += 1
        return out

    def log_line(self) -> str:
        c = self.counts()
        vllm = (
            f"{self.vllm.raw} ({self.vllm.source})"
            if self.vllm.raw
            else f"absent ({self.vllm.source})"
        )
        name = self.patchset.name if self.patchset is not None else "none"
        line = (
            f"flashhead {self.flashhead_version}: vLLM {vllm}; process {self.process}; patchset {name}; "
            f"applied {c['applied']}, pending {c['pending']}, skipped {c['skipped']}, failed {c['failed']}"
        )
        if self.patchset is not None and self.patchset.support:
            # Which runners and features FlashHead serves here (the rest is dense, with a reason
            # logged when it happens): the first thing to check when a server is slower than
            # expected.
            line += "; serves " + ", ".join(
                f"{k}={v}" for k, v in sorted(dict(self.patchset.support).items())
            )
        if self.note:
            line += f"; {self.note}"
        if self.error:
            line += f"; error: {self.error}"
        return line


def _record_sort_key(patchset: PatchSet | None) -> Callable[[PatchRecord], Any]:
    order = {p.id: i for i, p in enumerate(patchset.patches)} if patchset is not None else {}
    return lambda r: order.get(r.patch_id, len(order))


def activate(
    engine: PatchEngine,
    *,
    process: ProcessInfo | None = None,
    force_import: bool = False,
    enabled: Callable[[], bool] | None = None,
    directory: Path | None = None,
) -> Activation:
    """Detect, select and apply. Never raises for bad YAML or failing patches: see the records."""
    from flashhead import runtime

    t0 = time.perf_counter()
    version = detect_vllm_version()
    proc = process or current_process()
    env_on = runtime.env_enabled()
    pdir = directory or patchset_dir()
    act = Activation(__version__, version, proc, env_on, env_on, pdir)

    loaded = load_patchsets(pdir)
    act.problems = [str(p) for p in loaded.problems] + check_ranges(loaded.patchsets)
    chosen = None
    if version.present:
        chosen = select_patchset(loaded.patchsets, version.release_for_matching)
    act.patchset = chosen
    if chosen is None:
        act.note = _no_patchset_note(version, loaded, pdir)
        act.flashhead_enabled = False
        act.seconds = time.perf_counter() - t0
        return act
    if chosen.serve != "flashhead":
        act.flashhead_enabled = False
        act.note = f"serve: {chosen.serve} ({chosen.reason})"
    elif not env_on:
        act.note = f"{runtime.ENABLED_ENV}=0: FlashHead patches off, architectures registered"

    act.always_set = f"{chosen.name}:always"
    act.main_set = chosen.name
    always, main, skipped = [], [], []
    for spec in chosen.patches:
        if not hosts(proc.kind, spec.process):
            needed = ", ".join(spec.process or ())
            skipped.append((spec, "skipped-process", f"needed in {needed}, this is {proc.kind}"))
        elif spec.always:
            always.append(spec)
        elif not act.flashhead_enabled:
            skipped.append((spec, "disabled", act.note))
        else:
            main.append(spec)

    switch = enabled or runtime.kill_switch_on
    engine.apply(always, set_id=act.always_set, enabled=lambda: True, force_import=force_import)
    engine.apply(main, set_id=act.main_set, enabled=switch, force_import=force_import)
    for spec, status, reason in skipped:
        set_id = act.always_set if spec.always else act.main_set
        engine.record_skipped(spec, set_id=set_id, status=status, reason=reason)
    act.records = sorted(
        engine.records(act.always_set) + engine.records(act.main_set), key=_record_sort_key(chosen)
    )
    act.seconds = time.perf_counter() - t0
    return act


def _no_patchset_note(version: VersionInfo, loaded: LoadResult, pdir: Path) -> str:
    if not version.present:
        return f"vLLM not found ({version.error or version.source}); nothing to patch"
    broken = ", ".join(p.name for p in loaded.failed_files)
    return f"no patchset for vLLM {version.release_for_matching} in {pdir}" + (
        f" (unreadable: {broken})" if broken else ""
    )


def _ensure_log_handler() -> None:
    """Make INFO lines visible in vLLM's processes, which configure only the `vllm` logger."""
    logger.setLevel(logging.getLevelName(settings().log_level))
    # A root handler set up by someone else only counts if it lets our level through: vLLM 0.16's
    # API server has one at ERROR, and the start-up line vanished there.
    wanted = logger.getEffectiveLevel()
    if logger.handlers or any(h.level <= wanted for h in logging.getLogger().handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(asctime)s [flashhead] %(message)s", "%m-%d %H:%M:%S")
    )
    logger.addHandler(handler)


def register() -> None:
    """Once per process: activate FlashHead for the running vLLM. Never raises."""
    global _registered
    try:
        with _register_lock:
            if _registered:
                return
            _registered = True
            _register_once()
    except BaseException as exc:  # noqa: BLE001 - vLLM must start even if flashhead is broken
        try:
            logger.error("flashhead: activation failed, vLLM runs stock: %r", exc)
        except BaseException:  # noqa: BLE001
            pass


def _register_once() -> None:
    from flashhead import runtime
    from flashhead.vllm_kinds import vllm_kinds

    _ensure_log_handler()
    engine = PatchEngine(kinds=vllm_kinds())
    try:
        act = activate(engine)
    except Exception as exc:
        engine.unpatch()
        act = Activation(
            __version__,
            detect_vllm_version(),
            current_process(),
            False,
            runtime.env_enabled(),
            patchset_dir(),
        )
        act.error = f"{type(exc).__name__}: {exc}"
    runtime.install(engine, act, act.main_set)
    for problem in act.problems:
        logger.error("flashhead: patchset problem: %s", problem)
    for problem in settings().problems:  # once per process, in every vLLM process
        logger.error("flashhead: setting ignored: %s", problem)
    for r in act.records:
        if r.status in FAILED_STATUSES:
            level = logging.ERROR if r.required else logging.WARNING
            logger.log(level, "flashhead: patch %s: %s: %s", r.patch_id, r.status, r.reason)
    logger.info("%s", act.log_line())
    if act.flashhead_enabled:
        _setup_metrics(act.process.kind)


def _setup_metrics(process_kind: str) -> None:
    """Give a server's first process its /metrics channel (``flashhead.metrics``); engine and
    worker processes inherit it. A failure costs the metrics, never the server."""
    try:
        from flashhead import metrics

        if process_kind in metrics.SERVER_PROCESS_KINDS:
            metrics.setup_server_process()
    except Exception as exc:
        logger.warning("flashhead: /metrics counters unavailable: %r", exc)


def _reset_for_tests() -> None:
    global _registered
    from flashhead import runtime

    with _register_lock:
        _registered = False
    runtime.reset()
