"""Which vLLM process this is: ``api`` (OpenAI server), ``engine`` (EngineCore), ``worker``
(model runner) or ``main`` (anything else: ``LLM()`` scripts, single-process mode, doctor).

vLLM names its child processes through multiprocessing (0.32: ``EngineCore`` /
``EngineCore_DP<i>`` in v1/engine/utils.py, ``VllmWorker-<rank>`` in
v1/executor/multiproc_executor.py, ``ApiServer_<i>`` in v1/utils.py). Spawned children inherit the
parent's ``sys.argv``, so the process name is checked before the command line.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from dataclasses import dataclass

__all__ = ["PROCESS_KINDS", "ProcessInfo", "current_process", "current_process_kind", "hosts"]

PROCESS_KINDS = ("api", "engine", "worker", "main")

# Which roles a process kind may end up playing: an EngineCore with the uniprocess executor runs
# the worker in its own process; a `main` process (LLM() without multiprocessing) runs them all.
_HOSTS = {
    "api": ("api",),
    "engine": ("engine", "worker"),
    "worker": ("worker",),
    "main": PROCESS_KINDS,
}


@dataclass(frozen=True)
class ProcessInfo:
    kind: str
    name: str
    pid: int

    def __str__(self) -> str:
        return f"{self.kind} ({self.name}, pid {self.pid})"


def _kind_from_name(name: str) -> str | None:
    if name.startswith("EngineCore"):
        return "engine"
    if name.startswith(("VllmWorker", "Worker")):
        return "worker"
    if name.startswith("ApiServer"):
        return "api"
    return None


def _is_api_command(argv: list[str]) -> bool:
    if not argv:
        return False
    prog = argv[0].replace(os.sep, "/")
    if len(argv) > 1 and argv[1] == "serve":
        # `vllm serve` or `python -m vllm.entrypoints.cli.main serve`
        if os.path.basename(prog) == "vllm" or prog.endswith("vllm/entrypoints/cli/main.py"):
            return True
    return any(
        "vllm.entrypoints.openai.api_server" in a or a.endswith("openai/api_server.py")
        for a in argv[:3]
    )


def current_process() -> ProcessInfo:
    name = multiprocessing.current_process().name
    kind = _kind_from_name(name)
    if kind is None:
        kind = "api" if name == "MainProcess" and _is_api_command(list(sys.argv)) else "main"
    return ProcessInfo(kind, name, os.getpid())


def current_process_kind() -> str:
    return current_process().kind


def hosts(process_kind: str, needed: tuple[str, ...] | None) -> bool:
    """Whether a patch needed in `needed` (None = any) must be applied in `process_kind`."""
    if needed is None:
        return True
    return any(role in needed for role in _HOSTS.get(process_kind, PROCESS_KINDS))
