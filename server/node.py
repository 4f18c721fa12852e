"""A block server's lifecycle: resolve and load its blocks, join the DHT, serve RPCs, announce, leave cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind.dht import DHT

from server.adapters import load_adapters
from server.announce import Announcer
from server.backend import SpanBackend
from server.batching import BatchLimits
from server.metrics import ServerMetrics
from server.model import BlockSpan
from server.model.attention import avoid_cudnn_attention
from server.placement import choose_span
from server.push import Pusher
from server.rebalance import plan_move
from server.rpc import BlockHandler, ServingState
from server.sessions import SessionLimits, SessionRegistry
from server.settings import ServerSettings
from swarm import PROTOCOL_VERSION
from swarm.auth import SwarmSecret, swarm_secret
from swarm.dht import fetch_coverage
from swarm.identity import IdentityError, RecordSigner, SignedRecordValidator, load_identity
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.service import BlockService
from swarm.weights import ResolvedModel, resolve_model

logger = logging.getLogger(__name__)

LEAVE_GRACE_S = 5.0
"""How long a leaving server waits for its open sessions to hand over before it exits anyway."""

try:
    from importlib.metadata import version as _pkg_version

    VERSION = _pkg_version("petals-next")
except Exception:  # running from a source tree without installation
    VERSION = "0.0.0"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def write_ready_file(path: Path, payload: dict) -> None:
    """Atomically publish join information for a supervisor (the gateway's embedded swarm, tests)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def secret_of(settings: ServerSettings) -> SwarmSecret | None:
    """The private swarm's secret (None: a public swarm)."""
    return swarm_secret(settings.swarm_secret.get_secret_value() if settings.swarm_secret else None)


def start_dht(settings: ServerSettings, initial_peers: list[str]) -> tuple[DHT, RecordSigner]:
    """Join the DHT under the configured identity (or a fresh one for this run) and load its key for signing."""
    with tempfile.TemporaryDirectory(prefix="petals-identity-") as scratch:
        # hivemind writes a new identity file where none exists; a per-run one is read back and then deleted.
        identity_path = settings.identity_path or Path(scratch) / "identity.key"
        dht = DHT(
            initial_peers=initial_peers,
            host_maddrs=settings.host_maddrs,
            announce_maddrs=settings.announce_maddrs or None,
            identity_path=str(identity_path),
            record_validators=[SignedRecordValidator()],
            start=True,
        )
        try:
            signer = RecordSigner(load_identity(identity_path))
        except IdentityError as e:
            dht.shutdown()
            raise SystemExit(f"cannot sign records with this identity: {e}") from None
    if signer.peer_id != dht.peer_id.to_base58():
        dht.shutdown()
        raise SystemExit(f"identity {identity_path} does not match the DHT's peer id {dht.peer_id}")
    return dht, signer


@dataclass
class Hosting:
    """The span a server hosts right now and everything built for it; replaced whole when the server moves."""

    start: int
    end: int
    backend: SpanBackend
    sessions: SessionRegistry
    state: ServingState
    throughput: float
    weights_mb: float


async def host_span(settings: ServerSettings, resolved: ResolvedModel, start: int, end: int) -> Hosting:
    """Load blocks [start, end) (only their tensors), measure their speed, and set up sessions for them."""
    device = torch.device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    spec = resolved.spec
    logger.info("loading %s blocks %d:%d on %s (%s)", resolved.model_id, start, end, device, dtype)
    began = time.perf_counter()
    span = await asyncio.to_thread(BlockSpan.load, resolved, start, end, dtype, device)
    span.requires_grad_(False)
    span.eval()
    weights_mb = sum(p.numel() * p.element_size() for p in span.parameters()) / 2**20
    logger.info("loaded blocks %d:%d (%.1f MiB) in %.1fs", start, end, weights_mb, time.perf_counter() - began)
    limits = BatchLimits(settings.max_batch_tokens, settings.prefill_chunk_tokens, settings.batch_wait_ms / 1000)
    adapters = load_adapters(settings.adapters, spec, start, end, span.lora_targets, dtype, device)
    backend = SpanBackend(span, start, end, dtype, device, limits, adapters)
    throughput = await asyncio.to_thread(backend.measure_throughput, spec.hidden_size)
    sessions = SessionRegistry(
        spec,
        int(settings.cache_budget_mb * 2**20),
        dtype,
        device,
        hosted_blocks=end - start,
        page_tokens=settings.kv_page_tokens,
        alloc_timeout_s=settings.alloc_timeout_s,
        limits=SessionLimits(settings.max_sessions, settings.max_sessions_per_peer, settings.max_cache_share),
    )
    state = ServingState(
        model_id=resolved.model_id,
        start=start,
        end=end,
        hidden_size=spec.hidden_size,
        max_length=min(settings.max_session_length, spec.max_position_embeddings),
        version=VERSION,
    )
    return Hosting(start, end, backend, sessions, state, throughput, weights_mb)


class BlockServer:
    """One running server: its DHT peer, RPC handler, heartbeat and (with --blocks) rebalancing."""

    def __init__(
        self, settings: ServerSettings, resolved: ResolvedModel, dht: DHT, signer: RecordSigner, hosting: Hosting
    ):
        self.settings = settings
        self.signer = signer
        self.resolved = resolved
        self.dht = dht
        self.peer_id = dht.peer_id.to_base58()
        self.hosting = hosting
        self.secret = secret_of(settings)
        self.metrics = ServerMetrics()
        self.metrics.watch_sessions(hosting.sessions)
        self.handler = BlockHandler(
            hosting.state, hosting.backend, hosting.sessions, settings, self.metrics,
            peer_id=self.peer_id, secret=self.secret,
        )  # fmt: skip
        spec = resolved.spec
        model_record = ModelRecord(num_blocks=spec.num_hidden_layers, hidden_size=spec.hidden_size)
        self.announcer = Announcer(dht, self.peer_id, self.make_record, model_record, settings.announce_period_s)

    def make_record(self, server_state: ServerState) -> ServerRecord:
        hosting = self.hosting
        record = ServerRecord(
            model_id=self.resolved.model_id,
            start=hosting.start,
            end=hosting.end,
            state=server_state,
            throughput=hosting.throughput,
            cache_tokens_left=hosting.sessions.tokens_left(hosting.end - hosting.start),
            protocol_version=PROTOCOL_VERSION,
            version=VERSION,
            public_name=self.settings.public_name,
            device=str(hosting.backend.device),
            dtype=str(hosting.backend.dtype).split(".")[-1],
            adapters=sorted(hosting.backend.adapters),
            push=True,
        )
        record = ServerRecord.model_validate(self.signer.sign(record.to_wire()))
        if self.secret is not None:
            record.auth = self.secret.sign_record(record.to_wire(), self.peer_id)
        return record

    async def start(self) -> dict:
        """Register the RPC handlers, announce, print the summary; returns the join info for the ready file."""
        hosting = self.hosting
        self.metrics.describe(
            model_id=self.resolved.model_id, blocks=f"{hosting.start}:{hosting.end}", peer_id=self.peer_id,
            version=VERSION,
        )  # fmt: skip
        p2p = await self.dht.replicate_p2p()
        self.handler.attach(Pusher(p2p, self.peer_id, self.settings.push_timeout_s, self.secret))
        await BlockService().add_p2p_handlers(p2p, wrapper=self.handler)
        await self.announcer.announce_now(ServerState.ONLINE)
        self.announcer.start()
        maddrs = [str(m) for m in self.dht.get_visible_maddrs()]
        print(
            f"Serving {self.resolved.model_id} blocks {hosting.start}:{hosting.end} on {hosting.backend.device} "
            f"({str(hosting.backend.dtype).split('.')[-1]}), {hosting.throughput:.0f} blocks/s per token, "
            f"{hosting.weights_mb:.0f} MiB of weights\n"
            f"Peer id {self.peer_id}; others join with: --initial-peers {maddrs[0]}",
            flush=True,
        )
        ready = {"initial_peers": maddrs, "peer_id": self.peer_id, "start": hosting.start, "end": hosting.end}
        if self.settings.metrics_port is not None:
            ready["metrics_port"] = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
            print(f"Metrics on http://{self.settings.metrics_host}:{ready['metrics_port']}/metrics", flush=True)
        return ready

    async def rebalance_forever(self) -> None:
        """Every period (with jitter, so servers that started together do not move together), move to a span
        where the swarm is weaker when that lifts the swarm's bottleneck by more than the margin. A decision is
        confirmed after a random pause on a fresh view of the swarm, so two servers rarely make the same move."""
        period = self.settings.rebalance_period_s
        while True:
            await asyncio.sleep(period * random.uniform(0.5, 1.5))
            target = await self._plan()
            if target is None:
                continue
            await asyncio.sleep(period * random.uniform(0.0, 1.0))
            if await self._plan() == target:
                await self.move(*target)

    async def _plan(self) -> tuple[int, int] | None:
        try:
            num_blocks = self.resolved.spec.num_hidden_layers
            coverage = await fetch_coverage(self.dht, self.resolved.model_id, num_blocks, self.secret)
        except Exception as e:  # the DHT may hiccup; try again next period
            logger.warning("rebalancing: could not read the swarm's coverage: %s", e)
            return None
        current = (self.hosting.start, self.hosting.end)
        return plan_move(coverage, self.peer_id, current, self.hosting.throughput, self.settings.rebalance_margin)

    async def move(self, start: int, end: int) -> None:
        old = self.hosting
        logger.info("rebalancing: moving from blocks %d:%d to %d:%d", old.start, old.end, start, end)
        await self.announcer.announce_now(ServerState.OFFLINE, expiration_s=self.settings.announce_period_s * 3)
        await _hand_back_sessions(self.handler, old.sessions)
        await asyncio.to_thread(old.backend.shutdown)
        self.hosting = await host_span(self.settings, self.resolved, start, end)
        self.metrics.watch_sessions(self.hosting.sessions)
        self.handler.host(self.hosting.state, self.hosting.backend, self.hosting.sessions)
        await self.announcer.announce_now(ServerState.ONLINE)
        logger.info("rebalancing: now serving blocks %d:%d", start, end)

    async def leave(self) -> None:
        """Graceful leave: tell open sessions to continue elsewhere once their step in flight is answered (a
        client that comes back is refused with a retryable error and routes around us), announce offline so
        routing stops choosing us, let the compute queue drain, then go."""
        logger.info("leaving: handing %d open session(s) back, announcing offline", len(self.hosting.sessions.sessions))
        self.handler.leaving.set()
        await self.announcer.stop()
        try:
            await asyncio.wait_for(self.announcer.announce_now(ServerState.OFFLINE, expiration_s=30), 5)
        except Exception as e:
            logger.warning("could not announce offline state: %s", e)
        await _hand_back_sessions(self.handler, self.hosting.sessions)
        await asyncio.to_thread(self.hosting.backend.shutdown)
        self.metrics.shutdown()


async def serve(settings: ServerSettings) -> None:
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    avoid_cudnn_attention(torch.device(settings.device))
    resolved = await asyncio.to_thread(resolve_model, settings.model, settings.cache_dir, settings.model_id)
    if not settings.initial_peers and not settings.new_swarm:
        raise SystemExit("give --initial-peers to join a swarm, or --new-swarm to start one")

    dht, signer = await asyncio.to_thread(start_dht, settings, settings.initial_peers)
    start, end = await _pick_span(settings, dht, resolved.model_id, resolved.spec.num_hidden_layers)
    server = BlockServer(settings, resolved, dht, signer, await host_span(settings, resolved, start, end))
    ready = await server.start()
    if settings.ready_file:
        write_ready_file(settings.ready_file, ready)
    rebalancing = None
    if settings.span() is None and settings.rebalance_period_s > 0:
        rebalancing = asyncio.create_task(server.rebalance_forever())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        if rebalancing is not None:
            rebalancing.cancel()
        await server.leave()
        await asyncio.to_thread(dht.shutdown)


async def _hand_back_sessions(handler: BlockHandler, sessions: SessionRegistry) -> None:
    """Tell open sessions to continue elsewhere (they fail over at once) and wait a little for them to go."""
    handler.leaving.set()
    deadline = time.monotonic() + LEAVE_GRACE_S
    while sessions.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _pick_span(settings: ServerSettings, dht: DHT, model_id: str, num_blocks: int) -> tuple[int, int]:
    explicit = settings.span()
    if explicit is not None:
        start, end = explicit
        if end > num_blocks:
            raise SystemExit(f"--block-indices {start}:{end} is beyond the model's {num_blocks} blocks")
        return start, end
    count = settings.blocks or num_blocks
    coverage = await fetch_coverage(dht, model_id, num_blocks, secret_of(settings))
    return choose_span(coverage, num_blocks, count)


async def run_bootstrap(host_maddrs: list[str], identity_path: Path | None, ready_file: Path | None) -> None:
    """A DHT-only peer: the stable entry point of a swarm."""
    dht = await asyncio.to_thread(
        DHT,
        host_maddrs=host_maddrs,
        identity_path=str(identity_path) if identity_path else None,
        record_validators=[SignedRecordValidator()],
        start=True,
    )
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    print(
        "Bootstrap peer is up; join with:\n  " + "\n  ".join(f"--initial-peers {m}" for m in maddrs),
        flush=True,
    )
    if ready_file:
        write_ready_file(ready_file, {"initial_peers": maddrs, "peer_id": dht.peer_id.to_base58()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.to_thread(dht.shutdown)
