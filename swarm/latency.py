"""What this client measures of servers: round-trip times (rpc_info pings) and delivered decode throughput."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from hivemind.proto import runtime_pb2

from swarm.service import BlockService

if TYPE_CHECKING:
    from swarm.client import SwarmClient

UNREACHABLE_S = 1.0
"""Latency recorded for a server that did not answer a ping: routing then avoids it where it can."""


class LatencyTracker:
    def __init__(self, client: SwarmClient, ttl_s: float = 60.0, timeout_s: float = 1.0):
        self._client = client
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._measured: dict[str, tuple[float, float]] = {}  # peer -> (when, seconds)

    def snapshot(self) -> dict[str, float]:
        return {peer: rtt for peer, (_, rtt) in self._measured.items()}

    async def measure(self, peer_ids: list[str]) -> None:
        """Ping the peers whose latency is unknown or old, concurrently, within ``timeout_s``."""
        now = time.monotonic()
        stale = [p for p in set(peer_ids) if p not in self._measured or now - self._measured[p][0] > self._ttl_s]
        if stale:
            await asyncio.gather(*(self._ping(peer) for peer in stale))

    async def _ping(self, peer_id: str) -> None:
        stub = BlockService.get_stub(self._client.p2p, self._client.peer(peer_id))
        rtt = UNREACHABLE_S
        try:
            # The first call to a new peer also dials it; the second measures the round trip routing will pay.
            for _ in range(2):
                began = time.perf_counter()
                await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=self._timeout_s)
                rtt = min(rtt, time.perf_counter() - began)
        except Exception:  # any failure to answer a ping means "avoid if possible"
            rtt = UNREACHABLE_S
        self._measured[peer_id] = (time.monotonic(), rtt)


class ThroughputTracker:
    """Blocks per second each server has actually delivered on this client's decode steps (moving average)."""

    def __init__(self, smoothing: float = 0.2):
        self._smoothing = smoothing
        self._blocks_per_s: dict[str, float] = {}

    def observe(self, peer_id: str, num_blocks: int, seconds: float) -> None:
        rate = num_blocks / max(seconds, 1e-6)
        old = self._blocks_per_s.get(peer_id)
        self._blocks_per_s[peer_id] = rate if old is None else (1 - self._smoothing) * old + self._smoothing * rate

    def snapshot(self) -> dict[str, float]:
        return dict(self._blocks_per_s)
