"""Start, query and stop real ``vllm serve`` processes for tests and scripts (urllib only).

    with vllm_server(model_dir, tmp / "server.log", env={...}) as server:
        ids = server.greedy_ids(["def add(a, b):"], max_tokens=8)

or, to start several side by side (start-up dominates; they overlap well on 2 cores):

    servers = [VllmServer(a, log_a), VllmServer(b, log_b)]
    start_all(servers)
    ...
    for s in servers: s.stop()

Each server runs in its own process group (SIGTERM, then SIGKILL of the whole group on stop:
workers may outlive the API server), writes stdout+stderr to ``log_path``, and gets
``BASE_ENV`` (offline hub, 1 GiB CPU KV cache) plus the test's own ``env``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_ENV",
    "SERVE_ARGS",
    "ServerStartError",
    "VllmServer",
    "common_prefix_lengths",
    "free_port",
    "run_concurrently",
    "start_all",
    "vllm_env",
    "vllm_server",
]

BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "PYTHONUNBUFFERED": "1",
    "VLLM_NO_USAGE_STATS": "1",
}
# Lean servers: the e2e suite must stay inside the CI budget. Eager mode: on this class of
# machine torch.compile adds 20-30 s per start and the tests measure behaviour, not speed.
SERVE_ARGS = ("--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager")


def cpu_dtype_args(args: Sequence[str]) -> tuple[str, ...]:
    """`--dtype float32` where the caller set no dtype and this CPU computes bf16 slowly (no
    AVX-512-BF16 or AMX: torch's bf16 GEMM is ~200x slower than fp32 there); else nothing."""
    if "--dtype" in args:
        return ()
    from flashhead.compute_dtype import bf16_is_fast

    return () if bf16_is_fast("cpu") else ("--dtype", "float32")


START_TIMEOUT_S = float(os.environ.get("FLASHHEAD_E2E_START_TIMEOUT", "420"))
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class ServerStartError(RuntimeError):
    """`vllm serve` exited or did not become healthy; the message holds the log's tail."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Defaults for the servers of the test suite only (tests/conftest.py fills it), below this
# process's own environment; the demo and the benchmarks leave it empty.
SUITE_ENV: dict[str, str] = {}


def vllm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's env with ``SUITE_ENV`` under it and ``BASE_ENV`` over it, without the
    switches each test states itself."""
    env = {**SUITE_ENV, **os.environ}
    env.update(BASE_ENV)
    for key in ("VLLM_PLUGINS", "FLASHHEAD_ENABLED", "VLLM_USE_V2_MODEL_RUNNER"):
        env.pop(key, None)  # each test states what it wants
    env.update(extra or {})
    return env


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the server is the leader of its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


class VllmServer:
    """One ``vllm serve`` process; its combined output goes to ``log_path``.

    ``python``: the interpreter whose vLLM serves (default ``$FLASHHEAD_TEST_PYTHON`` or this
    one). ``args`` come after ``SERVE_ARGS``; ``self.args`` may be edited before ``start()``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        served_name: str | None = None,
        python: str | None = None,
    ):
        self.model = str(model)
        self.name = served_name or Path(self.model).name
        self.port = free_port()
        self.log_path = Path(log_path)
        self.env = vllm_env(env)
        self.args = [*SERVE_ARGS, *cpu_dtype_args(args), *args]
        self.python = python or os.environ.get("FLASHHEAD_TEST_PYTHON") or sys.executable
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        cmd = [
            self.python,
            "-m",
            "vllm.entrypoints.cli.main",
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            self.name,
            *self.args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> VllmServer:
        """Wait for /health. Raises ServerStartError with the log's tail."""
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"vllm serve {self.name} exited with {self.proc.returncode}; "
                    f"log {self.log_path}:\n{self.tail()}"
                )
            if self.healthy():
                return self
            time.sleep(1.0)
        raise ServerStartError(
            f"vllm serve {self.name} not healthy after {timeout:.0f}s; "
            f"log {self.log_path}:\n{self.tail()}"
        )

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            # SIGTERM to the server's own process group: API server, engine core and worker.
            _signal_group(self.proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # Workers may outlive the API server: always sweep the whole group.
        _signal_group(self.proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        return self.proc.returncode

    def log(self) -> str:
        """The server's output without terminal colours: vLLM 0.11 colours its "(Name pid=N)"
        prefixes even into a file."""
        try:
            return _ANSI_ESCAPE.sub("", self.log_path.read_text(errors="replace"))
        except OSError:
            return ""

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    # ---- requests ---------------------------------------------------------------------------

    def post(self, path: str, body: Mapping[str, Any], timeout: float = 300) -> dict:
        data = json.dumps({"model": self.name, **body}).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(
                f"{self.name} {path} -> HTTP {exc.code}: {exc.read()[:500]!r}"
            ) from None

    def complete(self, prompt: str | list[int], **params: Any) -> dict:
        """/v1/completions; the choices carry ``token_ids`` unless told otherwise."""
        params.setdefault("return_token_ids", True)
        return self.post("/v1/completions", {"prompt": prompt, **params})

    def greedy_ids(self, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
        def one(p: str) -> list[int]:
            r = self.complete(p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            return list(r["choices"][0]["token_ids"])

        return run_concurrently([lambda p=p: one(p) for p in prompts])


def common_prefix_lengths(a: Sequence[list[int]], b: Sequence[list[int]]) -> list[int]:
    """Per pair of completions (e.g. FlashHead vs dense greedy ids): how many leading tokens
    agree."""
    lengths = []
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        lengths.append(k)
    return lengths


def run_concurrently(calls: Sequence[Callable[[], Any]], max_workers: int = 32) -> list:
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


def start_all(servers: Sequence[VllmServer]) -> None:
    """Start servers side by side and wait for all; on any failure stop them all."""
    for s in servers:
        s.start()
    try:
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise


@contextlib.contextmanager
def vllm_server(
    model: str | os.PathLike[str], log_path: str | os.PathLike[str], **kwargs: Any
) -> Iterator[VllmServer]:
    """A started, healthy server (``VllmServer`` keywords), stopped on exit."""
    server = VllmServer(model, log_path, **kwargs)
    start_all([server])
    try:
        yield server
    finally:
        server.stop()
