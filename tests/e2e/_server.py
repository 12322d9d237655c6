"""Start, query and stop real ``vllm serve`` processes for the e2e tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
START_TIMEOUT_S = float(os.environ.get("FLASHHEAD_E2E_START_TIMEOUT", "420"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BASE_ENV)
    for key in ("VLLM_PLUGINS", "FLASHHEAD_ENABLED", "VLLM_USE_V2_MODEL_RUNNER"):
        env.pop(key, None)  # each test states what it wants
    env.update(extra or {})
    return env


class VllmServer:
    """One ``vllm serve`` process; its combined output goes to ``log_path``."""

    def __init__(
        self,
        model: str | Path,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        served_name: str | None = None,
    ):
        self.model = str(model)
        self.name = served_name or Path(self.model).name
        self.port = free_port()
        self.log_path = log_path
        self.env = vllm_env(env)
        self.args = [*SERVE_ARGS, *args]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> VllmServer:
        cmd = [
            sys.executable,
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
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> VllmServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vllm serve {self.name} exited with {self.proc.returncode}:\n{self.tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vllm serve {self.name} not ready in {timeout:.0f}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGTERM to the server's own process group: API server, engine core and worker.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

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

    def complete(self, prompt: str, **params: Any) -> dict:
        params.setdefault("return_token_ids", True)
        return self.post("/v1/completions", {"prompt": prompt, **params})

    def greedy_ids(self, prompts: Sequence[str], max_tokens: int) -> list[list[int]]:
        def one(p: str) -> list[int]:
            r = self.complete(p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            return list(r["choices"][0]["token_ids"])

        return run_concurrently([lambda p=p: one(p) for p in prompts])


def run_concurrently(calls: Sequence, max_workers: int = 32) -> list:
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        futures = [pool.submit(c) for c in calls]
        return [f.result() for f in futures]


def start_all(servers: Sequence[VllmServer]) -> None:
    """Start servers side by side (start-up dominates; they overlap well on 2 cores)."""
    for s in servers:
        s.start()
    try:
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
