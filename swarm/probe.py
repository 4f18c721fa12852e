"""Ask servers about themselves with ``rpc_info``: their live state and the round trip from here.

Probes run concurrently under a semaphore and each has a short timeout, so one dead peer costs at most that
timeout and a large swarm does not open hundreds of streams at once. A probe never raises: a failure is a
``ProbeResult`` with ``error`` set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.messages import ServerInfoResult
from swarm.records import ModelCoverage
from swarm.service import BlockService

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
PROBE_CONCURRENCY = 16


@dataclass(frozen=True)
class ProbeResult:
    """One server's answer to ``rpc_info`` (``info``, ``latency_s``), or why there was none (``error``)."""

    peer_id: str
    info: ServerInfoResult | None = None
    latency_s: float | None = None
    error: str | None = None


async def probe_server(p2p: P2P, peer_id: str, timeout_s: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """One ``rpc_info`` round trip (the first one to a peer includes dialing it)."""
    began = time.perf_counter()
    try:
        stub = BlockService.get_stub(p2p, PeerID.from_base58(peer_id))
        async with asyncio.timeout(timeout_s):
            response = await stub.rpc_info(runtime_pb2.ExpertRequest())
        latency = time.perf_counter() - began
        return ProbeResult(peer_id, ServerInfoResult.decode(response.metadata), latency)
    except TimeoutError:
        return ProbeResult(peer_id, error=f"no answer in {timeout_s:g}s")
    except Exception as e:  # any failure reads as "unreachable"; the reason is shown to the operator
        logger.debug("probing %s failed: %r", peer_id, e)
        return ProbeResult(peer_id, error=f"{type(e).__name__}: {e}"[:200])


async def probe_servers(
    p2p: P2P,
    peer_ids: Iterable[str],
    timeout_s: float = PROBE_TIMEOUT_S,
    concurrency: int = PROBE_CONCURRENCY,
) -> dict[str, ProbeResult]:
    """Probe every peer once, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def bounded(peer_id: str) -> ProbeResult:
        async with gate:
            return await probe_server(p2p, peer_id, timeout_s)

    unique = list(dict.fromkeys(peer_ids))
    results = await asyncio.gather(*(bounded(peer_id) for peer_id in unique))
    return {result.peer_id: result for result in results}


class _ClientLike(Protocol):
    p2p: P2P

    async def served_models(self) -> dict[str, ModelCoverage]: ...


class SwarmInspector:
    """What a monitor needs from a connected ``SwarmClient``: every announced model, and server probes."""

    def __init__(self, client: _ClientLike, timeout_s: float = PROBE_TIMEOUT_S, concurrency: int = PROBE_CONCURRENCY):
        self._client = client
        self._timeout_s = timeout_s
        self._concurrency = concurrency

    async def served_models(self) -> dict[str, ModelCoverage]:
        return await self._client.served_models()

    async def probe(self, peer_ids: Iterable[str]) -> dict[str, ProbeResult]:
        return await probe_servers(self._client.p2p, peer_ids, self._timeout_s, self._concurrency)
