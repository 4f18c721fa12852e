"""SwarmView: what the DHT announces (every model, every server) plus live probes, as one cached snapshot.

One snapshot serves every dashboard and scrape for ``ttl_s`` (dashboards poll every ~2 s, so many open pages
cost the swarm one lookup and one probe per server per refresh, not one per page).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway.metrics import GatewayMetrics
from gateway.schemas.swarm import BlockCoverage, BlockRange, SwarmModel, SwarmResponse, SwarmServer
from swarm.probe import ProbeResult
from swarm.records import ModelCoverage, RemoteServer
from swarm.status import readiness, summarize_coverage

logger = logging.getLogger(__name__)

SNAPSHOT_TTL_S = 1.5
LOOKUP_TIMEOUT_S = 10.0


class SwarmInspectorLike(Protocol):
    """``swarm.probe.SwarmInspector`` (a fake in tests)."""

    async def served_models(self) -> dict[str, ModelCoverage]: ...

    async def probe(self, peer_ids: Iterable[str]) -> dict[str, ProbeResult]: ...


@dataclass(frozen=True)
class SwarmSnapshot:
    generated_at: float
    models: list[SwarmModel] = field(default_factory=list)
    servers: list[SwarmServer] = field(default_factory=list)
    error: str | None = None


class SwarmView:
    """Builds and caches snapshots; ``configured`` ({model id: blocks}) shows this gateway's models even unannounced."""

    def __init__(
        self,
        inspector: SwarmInspectorLike,
        configured: Mapping[str, int],
        metrics: GatewayMetrics,
        ttl_s: float = SNAPSHOT_TTL_S,
    ):
        self._inspector = inspector
        self._configured = dict(configured)
        self._metrics = metrics
        self._ttl_s = ttl_s
        self._lock = asyncio.Lock()
        self._cached: tuple[float, SwarmSnapshot] | None = None

    async def snapshot(self) -> SwarmSnapshot:
        async with self._lock:  # concurrent callers share one lookup
            if self._cached and time.monotonic() - self._cached[0] < self._ttl_s:
                return self._cached[1]
            snapshot = await self._build()
            self._cached = (time.monotonic(), snapshot)
            return snapshot

    async def report(self) -> SwarmResponse:
        """The snapshot plus the gateway's live stats (those are never cached)."""
        snap = await self.snapshot()
        return SwarmResponse(
            generated_at=snap.generated_at,
            models=snap.models,
            servers=snap.servers,
            gateway=self._metrics.stats(),
            error=snap.error,
        )

    async def _build(self) -> SwarmSnapshot:
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT_S):
                coverages = dict(await self._inspector.served_models())
        except Exception as e:  # the page shows the reason; the next refresh tries again
            logger.warning("swarm lookup failed: %r", e)
            return SwarmSnapshot(generated_at=time.time(), error=f"swarm lookup failed: {type(e).__name__}: {e}")
        for model_id, num_blocks in self._configured.items():
            if model_id not in coverages:  # nobody announces it (any more): all of it is missing
                coverages[model_id] = ModelCoverage(model_id, num_blocks, missing=list(range(num_blocks)))
        servers = [server for coverage in coverages.values() for server in coverage.servers]
        probes = await self._inspector.probe(server.peer_id for server in servers)
        models = [self._model(coverage) for coverage in coverages.values()]
        models.sort(key=lambda m: (not m.served_here, m.model_id))
        rows = [server_row(server, probes.get(server.peer_id)) for server in servers]
        rows.sort(key=lambda s: (s.model_id, s.start, s.end, s.public_name or "", s.peer_id))
        self._metrics.set_coverage({m.model_id: (len(m.missing), m.servers_online) for m in models})
        return SwarmSnapshot(generated_at=time.time(), models=models, servers=rows)

    def _model(self, coverage: ModelCoverage) -> SwarmModel:
        summary = summarize_coverage(coverage)
        return SwarmModel(
            model_id=coverage.model_id,
            num_blocks=coverage.num_blocks,
            complete=summary.complete,
            status=readiness(summary),
            missing=sorted(coverage.missing),
            missing_ranges=[BlockRange(start=a, end=b) for a, b in summary.missing],
            blocks=[
                BlockCoverage(index=i, servers=b.servers, throughput=round(b.throughput, 2))
                for i, b in enumerate(summary.blocks)
            ],
            servers_online=summary.servers_online,
            served_here=coverage.model_id in self._configured,
        )


def server_row(server: RemoteServer, probe: ProbeResult | None) -> SwarmServer:
    """One row of the servers table: the announced record, overlaid with what the probe saw live."""
    record = server.record
    info = probe.info if probe else None
    return SwarmServer(
        peer_id=server.peer_id,
        public_name=record.public_name,
        model_id=record.model_id,
        start=record.start,
        end=record.end,
        state=record.state.value,
        throughput=round(record.throughput, 2),
        cache_tokens_left=info.cache_tokens_left if info else record.cache_tokens_left,
        version=record.version,
        device=record.device,
        dtype=record.dtype,
        reachable=info is not None,
        latency_ms=round(probe.latency_s * 1000, 2) if probe and probe.latency_s is not None else None,
        active_sessions=info.active_sessions if info else None,
        probe_error=probe.error if probe else None,
    )
