"""FlashHead's Prometheus metrics: declared here, counted in the workers, shown on the API
server's ``/metrics`` next to vLLM's own.

The rows are counted where the logits are computed, in vLLM's engine or worker processes; the
API server, another process, serves ``/metrics``. The channel between them:

- ``setup_server_process()`` (called by the plugin's ``register()``) runs first in the process
  that starts vLLM (``vllm serve``'s API server, or an offline ``LLM``). It creates a private
  directory, exports it as ``FLASHHEAD_METRICS_DIR`` (the engine and worker processes it spawns
  inherit it) and registers ``FlashHeadCollector`` with ``prometheus_client``'s default
  registry, the one vLLM's ``/metrics`` serves. The directory is removed at exit.
- Each counting process keeps its counters in memory and a daemon thread writes them, at most
  every ``FLUSH_INTERVAL_S``, as one JSON file per process (``worker-<pid>.json``, replaced
  atomically). A scrape sums the files.

Two servers never share a directory (each creates its own), and nothing is written to a fixed
path.

vLLM's multiprocess Prometheus mode (several API servers: ``--api-server-count`` > 1, which
``--data-parallel-size`` N implies) serves a fresh registry per scrape that reads
prometheus_client's own per-process files in ``PROMETHEUS_MULTIPROC_DIR``, and never the default
registry. There the counting processes, which inherit that variable, keep their counters as
prometheus_client metrics instead of a file (`_NativeMetrics`): vLLM's own channel, summed
across processes by prometheus_client, with no second reader to keep.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Names as exposed (prometheus_client adds the _total suffix to counters).
DECODE_ROWS = "flashhead_decode_rows"
SHADOW_ROWS = "flashhead_shadow_rows"
SHADOW_TOP1_AGREE = "flashhead_shadow_top1_agree"
SHADOW_TOP5_CONTAINED = "flashhead_shadow_top5_contained"
FALLBACK_ACTIVE = "flashhead_fallback_active"
HEADS = "flashhead_heads"
# `layout` label values of HEADS: a whole head in one process, or one rank's vocab shard.
LAYOUT_SINGLE, LAYOUT_TENSOR_PARALLEL = "single", "tensor_parallel_rank"

HELP = {
    DECODE_ROWS: "Logits rows of FlashHead models, by path (flashhead or dense) and dense reason.",
    SHADOW_ROWS: "FlashHead greedy rows also scored by the dense head (FLASHHEAD_SHADOW).",
    SHADOW_TOP1_AGREE: "Shadow rows whose FlashHead top-1 equals the dense top-1.",
    SHADOW_TOP5_CONTAINED: "Shadow rows whose dense top-1 is in FlashHead's top-5.",
    FALLBACK_ACTIVE: "1 once the shadow guard serves the model dense (FLASHHEAD_SHADOW_MIN_AGREEMENT).",
    HEADS: "FlashHead heads built for the model, by layout: one per single-rank worker (one per "
    "data-parallel engine), one per tensor-parallel rank.",
}
SHADOW_COUNTERS = (SHADOW_ROWS, SHADOW_TOP1_AGREE, SHADOW_TOP5_CONTAINED)

PROMETHEUS_MULTIPROC_DIR = (
    "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's variable (vLLM sets it), not ours
)

FLUSH_INTERVAL_S = 0.25
_FILE_PREFIX = "worker-"


class _NativeMetrics:
    """The same series as prometheus_client metrics, for vLLM's multiprocess mode (in a process
    started with PROMETHEUS_MULTIPROC_DIR, prometheus_client writes them to that directory)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.rows = Counter(
            DECODE_ROWS, HELP[DECODE_ROWS], ["model_name", "path", "reason"], registry=None
        )
        self.shadow = [Counter(n, HELP[n], ["model_name"], registry=None) for n in SHADOW_COUNTERS]
        self.fallback = Gauge(
            FALLBACK_ACTIVE,
            HELP[FALLBACK_ACTIVE],
            ["model_name"],
            registry=None,
            multiprocess_mode="max",
        )
        self.heads = Gauge(
            HEADS, HELP[HEADS], ["model_name", "layout"], registry=None, multiprocess_mode="sum"
        )


class RowCounters:
    """This process's counters. Thread-safe; cheap enough to call on every logits call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows: dict[tuple[str, str, str], int] = {}
        self.shadow: dict[str, list[int]] = {}  # model -> [rows, top1 agree, top5 contained]
        self.fallback: dict[str, int] = {}
        self.heads: dict[tuple[str, str], int] = {}  # (model, layout) -> heads in this process
        self.native: _NativeMetrics | None = None  # vLLM's multiprocess mode only
        self.version = 0  # bumped on every change, so the flusher writes only what changed

    def count_rows(self, model: str, path: str, reason: str, n: int) -> None:
        if n <= 0:
            return
        key = (model, path, reason if path == "dense" else "")
        with self._lock:
            self.rows[key] = self.rows.get(key, 0) + int(n)
            self.version += 1
            if self.native is not None:
                self.native.rows.labels(*key).inc(int(n))
                self.native.fallback.labels(model)  # shown as 0 until the guard trips

    def count_shadow(self, model: str, rows: int, top1_agree: int, top5_contained: int) -> None:
        with self._lock:
            acc = self.shadow.setdefault(model, [0, 0, 0])
            acc[0] += int(rows)
            acc[1] += int(top1_agree)
            acc[2] += int(top5_contained)
            self.version += 1
            if self.native is not None:
                for counter, value in zip(self.native.shadow, (rows, top1_agree, top5_contained)):
                    counter.labels(model).inc(int(value))

    def set_fallback(self, model: str, active: bool) -> None:
        with self._lock:
            self.fallback[model] = int(active)
            self.version += 1
            if self.native is not None:
                self.native.fallback.labels(model).set(int(active))

    def set_head(self, model: str, layout: str) -> None:
        """This process serves `model` with a FlashHead of `layout` (once per process)."""
        with self._lock:
            self.heads[(model, layout)] = 1
            self.version += 1
            if self.native is not None:
                self.native.heads.labels(model, layout).set(1)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rows": [[m, p, r, n] for (m, p, r), n in self.rows.items()],
                "shadow": {m: list(v) for m, v in self.shadow.items()},
                "fallback": dict(self.fallback),
                "heads": [[m, layout, n] for (m, layout), n in self.heads.items()],
            }


_counters = RowCounters()
_flusher_lock = threading.Lock()
_flusher: _Flusher | None = None
_server_dir: str | None = None  # the directory this process created (the API server)


def counters() -> RowCounters:
    """This process's counters; starts the writer thread on first use where a directory is
    set; in vLLM's multiprocess Prometheus mode keeps them as prometheus_client metrics instead."""
    if _counters.native is None and os.environ.get(PROMETHEUS_MULTIPROC_DIR):
        with _flusher_lock:
            if _counters.native is None:
                _counters.native = _NativeMetrics()
    if _counters.native is None:  # multiprocess mode serves no file reader: no file to write
        _ensure_flusher()
    return _counters


def metrics_dir() -> str | None:
    if _server_dir is not None:
        return _server_dir
    from flashhead.settings import settings

    return settings().metrics_dir


class _Flusher(threading.Thread):
    def __init__(self, directory: Path) -> None:
        super().__init__(name="flashhead-metrics", daemon=True)
        self.path = directory / f"{_FILE_PREFIX}{os.getpid()}.json"
        self._written = -1
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            self.flush()

    def flush(self) -> None:
        version = _counters.version
        if version == self._written or not self.path.parent.is_dir():
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(_counters.snapshot()))
            os.replace(tmp, self.path)
            self._written = version
        except OSError:  # the server is shutting down and removed the directory
            pass


def _ensure_flusher() -> None:
    global _flusher
    if _flusher is not None:
        return
    directory = metrics_dir()
    if not directory:
        return
    with _flusher_lock:
        if _flusher is None:
            flusher = _Flusher(Path(directory))
            try:
                flusher.start()
            except RuntimeError:  # no thread for the writer: count, flush at exit only
                pass
            atexit.register(flusher.flush)
            _flusher = flusher


def flush_now() -> None:
    """Write this process's counters now (tests; the thread does it otherwise)."""
    _ensure_flusher()
    if _flusher is not None:
        _flusher.flush()


def read_directory(directory: str | os.PathLike) -> dict[str, Any]:
    """The sum of every process's file in ``directory``: the same shape as a snapshot."""
    rows: dict[tuple[str, str, str], int] = {}
    shadow: dict[str, list[int]] = {}
    fallback: dict[str, int] = {}
    heads: dict[tuple[str, str], int] = {}
    for path in sorted(Path(directory).glob(f"{_FILE_PREFIX}*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # replaced or removed while we read: next scrape
            continue
        for model, p, reason, n in data.get("rows", ()):
            rows[(model, p, reason)] = rows.get((model, p, reason), 0) + int(n)
        for model, values in data.get("shadow", {}).items():
            acc = shadow.setdefault(model, [0, 0, 0])
            for i, v in enumerate(values[:3]):
                acc[i] += int(v)
        for model, active in data.get("fallback", {}).items():
            fallback[model] = max(fallback.get(model, 0), int(active))
        for model, layout, n in data.get("heads", ()):
            heads[(model, layout)] = heads.get((model, layout), 0) + int(n)
    return {
        "rows": [[m, p, r, n] for (m, p, r), n in sorted(rows.items())],
        "shadow": shadow,
        "fallback": fallback,
        "heads": [[m, layout, n] for (m, layout), n in sorted(heads.items())],
    }


class FlashHeadCollector:
    """A ``prometheus_client`` collector over one metrics directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def describe(self) -> list:
        return []  # no fixed series: they appear with the first FlashHead model's rows

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        data = read_directory(self.directory)
        if not (data["rows"] or data["shadow"] or data["fallback"]):
            return
        rows = CounterMetricFamily(
            DECODE_ROWS, HELP[DECODE_ROWS], labels=["model_name", "path", "reason"]
        )
        for model, path, reason, n in data["rows"]:
            rows.add_metric([model, path, reason], n)
        yield rows
        for i, name in enumerate(SHADOW_COUNTERS):
            family = CounterMetricFamily(name, HELP[name], labels=["model_name"])
            for model, values in sorted(data["shadow"].items()):
                family.add_metric([model], values[i])
            yield family
        gauge = GaugeMetricFamily(FALLBACK_ACTIVE, HELP[FALLBACK_ACTIVE], labels=["model_name"])
        for model in sorted(set(data["fallback"]) | {m for m, *_ in data["rows"]}):
            gauge.add_metric([model], data["fallback"].get(model, 0))
        yield gauge
        heads = GaugeMetricFamily(HEADS, HELP[HEADS], labels=["model_name", "layout"])
        for model, layout, n in data["heads"]:
            heads.add_metric([model, layout], n)
        yield heads


SERVER_PROCESS_KINDS = ("api", "main")  # flashhead.compat.process kinds that root a server


def setup_server_process(registry: Any = None) -> str | None:
    """In the first process of a server (``vllm serve``'s API server, or a script's ``LLM``):
    create its metrics directory, export it to the processes it starts, and show its metrics on
    ``registry`` (default: prometheus_client's). Such a process always makes its own, even if
    it inherited one (a server started from a process that had set one up, such as a test
    runner, is a server of its own). Returns the directory."""
    global _server_dir
    from flashhead.settings import METRICS_DIR_ENV

    if _server_dir is not None:
        return _server_dir
    directory = tempfile.mkdtemp(prefix="flashhead-metrics-")
    os.environ[METRICS_DIR_ENV] = directory
    _server_dir = directory
    atexit.register(shutil.rmtree, directory, True)
    if registry is None:
        from prometheus_client import REGISTRY as registry
    registry.register(FlashHeadCollector(directory))
    return directory
