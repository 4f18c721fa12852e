"""The local dev swarm: a bootstrap DHT peer and N block servers as child processes of the gateway.

Child contract (``server.cli``): each child writes ``{"initial_peers": [...]}`` to its ``--ready-file``
(via a temp file and a rename) once it is ready. Readiness is polled with a deadline; a child that dies fails
the start at once with the tail of its log; every child is stopped (SIGTERM, then SIGKILL) on the way out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gateway.generation.model import LoadedModel
from gateway.generation.protocols import SwarmClientLike
from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
POLL_S = 0.2
LOG_TAIL_CHARS = 3000


class EmbeddedSwarmError(RuntimeError):
    """The embedded swarm could not start (a child died or a deadline passed)."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_path: Path
    log_file: IO[bytes]

    def log_tail(self) -> str:
        self.log_file.flush()
        text = self.log_path.read_text(errors="replace")
        return text[-LOG_TAIL_CHARS:]


def split_blocks(num_blocks: int, num_servers: int) -> list[tuple[int, int]]:
    """Even half-open spans: split_blocks(30, 2) == [(0, 15), (15, 30)]."""
    k = max(1, min(num_servers, num_blocks))
    bounds = [round(i * num_blocks / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


class EmbeddedSwarm:
    """Owns the child processes; ``start()`` returns the bootstrap's multiaddrs once every server is ready."""

    def __init__(
        self,
        settings: GatewaySettings,
        models: Sequence[LoadedModel],
        server_command: Sequence[str] = (sys.executable, "-m", "server.cli"),
    ):
        self._settings = settings
        self._models = list(models)
        self._command = list(server_command)
        self.log_dir = Path(tempfile.mkdtemp(prefix="petals-gateway-swarm-"))
        self._children: list[_Child] = []

    async def start(self) -> list[str]:
        deadline = time.monotonic() + self._settings.startup_timeout_s
        try:
            boot = self._spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
            peers = await self._wait_ready(boot, deadline)
            logger.info("embedded bootstrap peer at %s (logs in %s)", " ".join(peers), self.log_dir)
            servers = []
            for model in self._models:
                for start, end in split_blocks(model.num_blocks, self._settings.embedded_servers):
                    args = [
                        "run", "--model", model.ref, "--block-indices", f"{start}:{end}",
                        "--initial-peers", *peers, "--cache-dir", str(self._settings.cache_dir),
                        "--host-maddrs", "/ip4/127.0.0.1/tcp/0",  # a private dev swarm stays on loopback
                    ]  # fmt: skip
                    servers.append(self._spawn(f"server-{len(servers)}-{start}-{end}", args))
            for child in servers:
                await self._wait_ready(child, deadline)
            logger.info("embedded swarm: %d server(s) ready", len(servers))
            return peers
        except BaseException:
            await self.stop()
            raise

    def _spawn(self, name: str, args: list[str]) -> _Child:
        ready_file = self.log_dir / f"{name}.ready.json"
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 -- closed in stop()
        argv = [*self._command, *args, "--ready-file", str(ready_file)]
        logger.info("starting %s: %s", name, " ".join(argv))
        # A new session: Ctrl+C in the gateway's terminal reaches the gateway only, which then stops children.
        env = dict(os.environ)
        if self._settings.swarm_secret is not None:
            # Through the environment, not a flag: flags show in every process list.
            env["PETALS_SERVER_SWARM_SECRET"] = self._settings.swarm_secret.get_secret_value()
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        child = _Child(name, process, ready_file, log_path, log_file)
        self._children.append(child)
        return child

    async def _wait_ready(self, child: _Child, deadline: float) -> list[str]:
        while True:
            if child.ready_file.exists():
                peers = json.loads(child.ready_file.read_text()).get("initial_peers") or []
                if not peers:
                    raise EmbeddedSwarmError(f"{child.name} wrote no initial_peers to {child.ready_file}")
                return [str(p) for p in peers]
            code = child.process.poll()
            if code is not None:
                raise EmbeddedSwarmError(
                    f"{child.name} exited with code {code} before it was ready; log tail "
                    f"({child.log_path}):\n{child.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise EmbeddedSwarmError(
                    f"{child.name} not ready after {self._settings.startup_timeout_s:.0f}s; log tail "
                    f"({child.log_path}):\n{child.log_tail()}"
                )
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        """SIGTERM every child (servers before the bootstrap), SIGKILL those alive after the grace period."""
        children, self._children = list(reversed(self._children)), []
        for child in children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while any(c.process.poll() is None for c in children) and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        for child in children:
            if child.process.poll() is None:
                logger.warning("%s ignored SIGTERM for %.0fs; killing it", child.name, STOP_GRACE_S)
                child.process.kill()
                child.process.wait()
            child.log_file.close()
        if children:
            logger.info("embedded swarm stopped (logs kept in %s)", self.log_dir)


async def wait_until_served(swarm: SwarmClientLike, model_ids: Sequence[str], timeout_s: float) -> None:
    """Poll the swarm until every model's blocks are all announced (servers announce asynchronously)."""
    deadline = time.monotonic() + timeout_s
    for model_id in model_ids:
        while True:
            try:
                coverage = await swarm.model_coverage(model_id)
                if coverage.complete:
                    break
                status = f"missing blocks {coverage.missing}"
            except Exception as e:  # not announced yet reads as an error on some paths; keep polling
                status = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise EmbeddedSwarmError(f"model {model_id} not fully served after {timeout_s:.0f}s ({status})")
            await asyncio.sleep(0.5)


def ready_banner(settings: GatewaySettings, model_id: str) -> str:
    """What to tell a developer once the embedded swarm serves every model."""
    url = f"http://{settings.host}:{settings.port}/v1"
    auth = ' -H "Authorization: Bearer $KEY"' if settings.api_keys else ""
    body = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32})
    return (
        f"\nGateway ready at {url}\nTry:\n  curl {url}/chat/completions -H 'Content-Type: application/json'"
        f"{auth} -d '{body}'\n"
    )
