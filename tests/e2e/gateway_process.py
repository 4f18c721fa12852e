"""The real gateway (``python -m gateway.cli serve``) as a child process of a test or benchmark run.

It binds port 0 and the port is read back from uvicorn's "running on" line (printed after the lifespan is up);
readiness is then polled on ``/health`` with a deadline; a gateway that dies fails at once with its log;
teardown is by PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.harness import REPO, Child, LocalSwarm

START_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0
_RUNNING = re.compile(r"Uvicorn running on http://[^:\s]+:(\d+)")


class GatewayDied(RuntimeError):
    """The gateway process exited (or never got ready); the message carries its log tail."""


class GatewayProcess:
    """One ``gateway.cli serve`` child; ``base_url`` is ``http://127.0.0.1:<port>`` once ``wait_ready`` returns."""

    def __init__(self, workdir: Path, args: Sequence[str], name: str = "gateway"):
        for flag, value in zip(args, args[1:], strict=False):
            if flag == "--log-level" and value not in ("debug", "info"):
                raise ValueError("the port is read from uvicorn's info log line: keep --log-level at info or debug")
        self.name = name
        self.log_path = workdir / f"{name}.log"
        # Only what the flags say: a PETALS_GATEWAY_* variable of the caller's shell must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PETALS_GATEWAY_")}
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
            )
        self.port: int | None = None

    @classmethod
    def start(
        cls,
        workdir: Path,
        initial_peers: Sequence[str],
        cache_dir: Path,
        models: Sequence[str],
        *extra: str,
        name: str = "gateway",
    ) -> GatewayProcess:
        args = ["--initial-peers", *initial_peers, "--models", *models, "--cache-dir", str(cache_dir), *extra]
        return cls(workdir, args, name)

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} is not ready yet")
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def _check_alive(self) -> None:
        if not self.alive():
            raise GatewayDied(f"{self.name} exited with code {self.process.returncode}:\n{self.log()[-6000:]}")

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S, complete: bool = True) -> dict[str, Any]:
        """Wait for the port, then for ``/health`` (with every model fully served when ``complete``)."""
        deadline = time.monotonic() + timeout_s
        while self.port is None:
            self._check_alive()
            found = _RUNNING.search(self.log())
            if found:
                self.port = int(found.group(1))
                break
            if time.monotonic() > deadline:
                raise GatewayDied(f"{self.name} did not bind a port in {timeout_s:.0f}s:\n{self.log()[-6000:]}")
            time.sleep(0.1)
        want = (lambda h: all(m["complete"] for m in h["models"].values())) if complete else (lambda h: True)
        return self.wait_health(want, max(1.0, deadline - time.monotonic()))

    def wait_health(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        """Poll ``/health`` until ``predicate(body)`` holds; a dead gateway or the deadline fails with the log."""
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            self._check_alive()
            try:
                response = httpx.get(f"{self.base_url}/health", timeout=10)
                last = response.json() if response.status_code == 200 else (response.status_code, response.text)
                if response.status_code == 200 and predicate(last):
                    return last
            except httpx.HTTPError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise GatewayDied(
                    f"{self.name} /health not as expected after {timeout_s:.0f}s (last: {last}):\n{self.log()[-6000:]}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period (the gateway's own graceful shutdown is 5 s)."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def running_gateway(
    swarm: LocalSwarm,
    workdir: Path,
    cache_dir: Path,
    models: Sequence[str],
    *extra: str,
    servers: Sequence[Child] = (),
    failures: Callable[[], int] = lambda: 0,
) -> Iterator[GatewayProcess]:
    """A gateway on ``swarm``, started beside ``servers`` (spawned with wait=False) and ready once they are and
    its models are fully served. Its log is printed if ``failures()`` grew meanwhile or it died; then stopped."""
    gateway = GatewayProcess.start(workdir, swarm.initial_peers, cache_dir, models, *extra)
    failures_before = failures()
    try:
        for server in servers:
            swarm.wait_ready(server)
        gateway.wait_ready()
        yield gateway
    finally:
        if failures() > failures_before or not gateway.alive():
            print(f"===== {gateway.name} =====\n{gateway.log()[-8000:]}")
        gateway.stop()
