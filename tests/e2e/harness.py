"""A real loopback swarm for tests: bootstrap and block servers as child processes of the test run.

Readiness is polled through each child's ready file with a deadline; a child that dies fails the test at once
with its log; everything is torn down by PID. Logs of all children are printed when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarm.messages import StepResult  # noqa: E402
from swarm.service import BlockService  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    ready_file: Path
    log_path: Path
    info: dict = field(default_factory=dict)

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        """SIGKILL takes the child's whole process group, as a machine that dies takes a server's process, its
        DHT process and its p2p daemon (a lone SIGKILL would leave the DHT process orphaned and the streams open).
        Other signals go to the server process only (SIGTERM: graceful leave; SIGSTOP: a hung server)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL:
                    os.killpg(self.process.pid, sig)
                else:
                    os.kill(self.process.pid, sig)

    def alive(self) -> bool:
        return self.process.poll() is None


class LocalSwarm:
    def __init__(self, workdir: Path, cache_dir: Path):
        self.workdir = workdir
        self.cache_dir = cache_dir
        self.children: list[Child] = []
        self.initial_peers: list[str] = []

    def start_bootstrap(self) -> Child:
        child = self._spawn("bootstrap", ["bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
        self.wait_ready(child)
        self.initial_peers = child.info["initial_peers"]
        return child

    def start_server(
        self,
        model: str,
        span: str | None = None,
        *extra: str,
        wait: bool = True,
        module: str = "server.cli",
        module_args: tuple[str, ...] = (),
    ) -> Child:
        """``module``: the entry point to run, a test-only wrapper of ``server.cli`` (e.g. a lying server) that
        takes its own ``module_args`` before the command."""
        args = [*module_args, "run", "--model", str(model), "--initial-peers", *self.initial_peers,
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--cache-dir", str(self.cache_dir),
                "--announce-period-s", "1", "--num-threads", "1", *extra]  # fmt: skip
        if span is not None:
            args += ["--block-indices", span]
        child = self._spawn(f"server{len(self.children)}-{(span or 'auto').replace(':', '_')}", args, module)
        if wait:
            self.wait_ready(child)
        return child

    def _spawn(self, name: str, args: list[str], module: str = "server.cli") -> Child:
        ready_file = self.workdir / f"{name}.ready.json"
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, *args, "--ready-file", str(ready_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )
        child = Child(name, process, ready_file, log_path)
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not child.ready_file.exists():
            if not child.alive():
                raise RuntimeError(f"{child.name} died (exit {child.process.returncode}):\n{child.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{child.name} not ready after {timeout_s}s:\n{child.log()[-4000:]}")
            time.sleep(0.1)
        child.info = json.loads(child.ready_file.read_text())

    def dump_logs(self) -> str:
        return "\n".join(f"===== {c.name} =====\n{c.log()[-3000:]}" for c in self.children)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.signal(signal.SIGCONT)  # a SIGSTOPped child must wake up to die gracefully
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.signal(signal.SIGKILL)
                child.process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)  # whatever the group left behind


async def stream_once(client, peer_id: str, request) -> StepResult:
    """Send one raw inference request to a server and return its first answer's metadata."""
    stub = BlockService.get_stub(client.p2p, client.peer(peer_id))
    answered = asyncio.Event()

    async def requests():
        yield request
        await answered.wait()  # keep our side open, as a real client does, until the answer is read

    responses = await stub.rpc_inference(requests())
    try:
        response = await asyncio.wait_for(anext(responses), 30)
    finally:
        answered.set()
    return StepResult.decode(response.metadata)
