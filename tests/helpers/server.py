"""Start a real `vllm serve` for tests; talk to it with urllib only.

    with vllm_server(model_dir, log_path=tmp / "server.log") as server:
        text = server.complete("def add(a, b):", max_tokens=8)

The server runs in its own process group (SIGTERM, then SIGKILL of the whole group on stop), logs
stdout+stderr to `log_path`, and gets ``HF_HUB_OFFLINE=1`` and ``VLLM_CPU_KVCACHE_SPACE=1``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ServerStartError", "VllmServer", "free_port", "start_server", "vllm_server"]


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vllm_command(python: str) -> list[str]:
    script = Path(python).parent / "vllm"
    if script.exists():
        return [str(script)]
    return [python, "-m", "vllm.entrypoints.cli.main"]


@dataclass
class VllmServer:
    proc: subprocess.Popen
    port: int
    log_path: Path
    model_name: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def request(
        self, path: str, payload: Mapping[str, Any] | None = None, timeout: float = 120
    ) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def completion(
        self, prompt: str, *, max_tokens: int = 16, temperature: float = 0.0, **extra: Any
    ) -> dict:
        payload = {
            "model": self.model_name,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        payload.update(extra)
        return self.request("/v1/completions", payload)

    def complete(self, prompt: str, **kwargs: Any) -> str:
        return self.completion(prompt, **kwargs)["choices"][0]["text"]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            _signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # Workers may outlive the API server: always sweep the whole group.
        _signal_group(self.proc, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the server is the leader of its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def start_server(
    model: str | os.PathLike[str],
    *,
    log_path: str | os.PathLike[str],
    python: str | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    enforce_eager: bool = True,
    max_model_len: int = 512,
    served_model_name: str = "tiny",
    timeout: float = 300,
) -> VllmServer:
    """Start `vllm serve` and wait for /health. Raises ServerStartError with the log's tail."""
    python = python or os.environ.get("FLASHHEAD_TEST_PYTHON") or sys.executable
    port = port or free_port()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        *_vllm_command(python),
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        "4",
        "--served-model-name",
        served_model_name,
    ]
    if enforce_eager:
        cmd.append("--enforce-eager")
    cmd += list(extra_args)
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    full_env.update(env or {})
    log = open(log_path, "w")  # noqa: SIM115 - closed when the child has its own copy
    try:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    finally:
        log.close()
    server = VllmServer(proc, port, log_path, served_model_name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"vllm serve exited with {proc.returncode}; log {log_path}:\n{server.log_text()[-4000:]}"
            )
        if server.healthy():
            return server
        time.sleep(1.0)
    server.stop()
    raise ServerStartError(
        f"vllm serve not healthy after {timeout:.0f}s; log {log_path}:\n{server.log_text()[-4000:]}"
    )


@contextlib.contextmanager
def vllm_server(model: str | os.PathLike[str], **kwargs: Any) -> Iterator[VllmServer]:
    server = start_server(model, **kwargs)
    try:
        yield server
    finally:
        server.stop()
