"""A block server's lifecycle: resolve and load its blocks, join the DHT, serve RPCs, announce, leave cleanly."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path

import torch
from hivemind.dht import DHT

from server.announce import Announcer
from server.backend import SpanBackend
from server.batching import BatchLimits
from server.metrics import ServerMetrics
from server.model import BlockSpan
from server.placement import choose_span
from server.rpc import BlockHandler, ServingState
from server.sessions import SessionRegistry
from server.settings import ServerSettings
from swarm import PROTOCOL_VERSION
from swarm.dht import fetch_coverage
from swarm.records import ModelRecord, ServerRecord, ServerState
from swarm.service import BlockService
from swarm.weights import resolve_model

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


def start_dht(settings: ServerSettings, initial_peers: list[str]) -> DHT:
    return DHT(
        initial_peers=initial_peers,
        host_maddrs=settings.host_maddrs,
        announce_maddrs=settings.announce_maddrs or None,
        identity_path=str(settings.identity_path) if settings.identity_path else None,
        start=True,
    )


async def serve(settings: ServerSettings) -> None:
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    device = torch.device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    resolved = await asyncio.to_thread(resolve_model, settings.model, settings.cache_dir, settings.model_id)
    spec = resolved.spec
    if not settings.initial_peers and not settings.new_swarm:
        raise SystemExit("give --initial-peers to join a swarm, or --new-swarm to start one")

    dht = await asyncio.to_thread(start_dht, settings, settings.initial_peers)
    peer_id = dht.peer_id.to_base58()
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    start, end = await _pick_span(settings, dht, resolved.model_id, spec.num_hidden_layers)
    logger.info("loading %s blocks %d:%d on %s (%s)", resolved.model_id, start, end, device, dtype)
    began = time.perf_counter()
    span = await asyncio.to_thread(BlockSpan.load, resolved, start, end, dtype, device)
    span.requires_grad_(False)
    span.eval()
    weights_mb = sum(p.numel() * p.element_size() for p in span.parameters()) / 2**20
    logger.info("loaded blocks %d:%d (%.1f MiB) in %.1fs", start, end, weights_mb, time.perf_counter() - began)

    limits = BatchLimits(settings.max_batch_tokens, settings.prefill_chunk_tokens, settings.batch_wait_ms / 1000)
    backend = SpanBackend(span, start, end, dtype, device, limits)
    throughput = await asyncio.to_thread(backend.measure_throughput, spec.hidden_size)
    sessions = SessionRegistry(
        spec,
        int(settings.cache_budget_mb * 2**20),
        dtype,
        device,
        hosted_blocks=end - start,
        page_tokens=settings.kv_page_tokens,
        alloc_timeout_s=settings.alloc_timeout_s,
    )
    state = ServingState(
        model_id=resolved.model_id,
        start=start,
        end=end,
        hidden_size=spec.hidden_size,
        max_length=min(settings.max_session_length, spec.max_position_embeddings),
        version=VERSION,
    )
    metrics = ServerMetrics()
    metrics.watch_sessions(sessions)
    metrics.describe(model_id=resolved.model_id, blocks=f"{start}:{end}", peer_id=peer_id, version=VERSION)
    handler = BlockHandler(state, backend, sessions, settings, metrics)
    p2p = await dht.replicate_p2p()
    await BlockService().add_p2p_handlers(p2p, wrapper=handler)

    def make_record(server_state: ServerState) -> ServerRecord:
        return ServerRecord(
            model_id=resolved.model_id,
            start=start,
            end=end,
            state=server_state,
            throughput=throughput,
            cache_tokens_left=sessions.tokens_left(end - start),
            protocol_version=PROTOCOL_VERSION,
            version=VERSION,
            public_name=settings.public_name,
            device=str(device),
            dtype=str(dtype).split(".")[-1],
        )

    model_record = ModelRecord(num_blocks=spec.num_hidden_layers, hidden_size=spec.hidden_size)
    announcer = Announcer(dht, peer_id, make_record, model_record, settings.announce_period_s)
    await announcer.announce_now(ServerState.ONLINE)
    announcer.start()

    join = " ".join(f"--initial-peers {m}" for m in maddrs[:1])
    print(
        f"Serving {resolved.model_id} blocks {start}:{end} on {device} ({str(dtype).split('.')[-1]}), "
        f"{throughput:.0f} blocks/s per token, {weights_mb:.0f} MiB of weights\n"
        f"Peer id {peer_id}; others join with: {join}",
        flush=True,
    )
    ready = {"initial_peers": maddrs, "peer_id": peer_id, "start": start, "end": end}
    if settings.metrics_port is not None:
        ready["metrics_port"] = metrics.serve(settings.metrics_host, settings.metrics_port)
        print(f"Metrics on http://{settings.metrics_host}:{ready['metrics_port']}/metrics", flush=True)
    if settings.ready_file:
        write_ready_file(settings.ready_file, ready)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await _leave(handler, announcer, backend, sessions)
        metrics.shutdown()
        await asyncio.to_thread(dht.shutdown)


async def _leave(handler: BlockHandler, announcer: Announcer, backend: SpanBackend, sessions: SessionRegistry) -> None:
    """Graceful leave: announce offline first (routing stops choosing us), tell open sessions to fail over once
    their step in flight is answered, let the compute queue drain, then go."""
    logger.info("leaving: announcing offline, handing %d open session(s) back to clients", len(sessions.sessions))
    await announcer.stop()
    try:
        await asyncio.wait_for(announcer.announce_now(ServerState.OFFLINE, expiration_s=30), 5)
    except Exception as e:
        logger.warning("could not announce offline state: %s", e)
    handler.leaving.set()
    deadline = time.monotonic() + LEAVE_GRACE_S
    while sessions.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(backend.shutdown)


async def _pick_span(settings: ServerSettings, dht: DHT, model_id: str, num_blocks: int) -> tuple[int, int]:
    explicit = settings.span()
    if explicit is not None:
        start, end = explicit
        if end > num_blocks:
            raise SystemExit(f"--block-indices {start}:{end} is beyond the model's {num_blocks} blocks")
        return start, end
    count = settings.blocks or num_blocks
    coverage = await fetch_coverage(dht, model_id, num_blocks)
    return choose_span(coverage, num_blocks, count)


async def run_bootstrap(host_maddrs: list[str], identity_path: Path | None, ready_file: Path | None) -> None:
    """A DHT-only peer: the stable entry point of a swarm."""
    dht = await asyncio.to_thread(
        DHT, host_maddrs=host_maddrs, identity_path=str(identity_path) if identity_path else None, start=True
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
