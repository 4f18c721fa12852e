"""Pure route choice: a chain of server spans that covers blocks [start, end) at the lowest estimated cost."""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from swarm.errors import MissingBlocksError
from swarm.records import ModelCoverage, RemoteServer, ServerState

DEFAULT_HOP_LATENCY_S = 0.005
"""Cost of one extra hop when a server's latency was never measured."""


@dataclass(frozen=True)
class Hop:
    """Run blocks [start, end) on ``server``."""

    server: RemoteServer
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


def missing_blocks(coverage: ModelCoverage, banned: Collection[str] = (), adapter: str | None = None) -> list[int]:
    covered = [False] * coverage.num_blocks
    for server in _usable(coverage.servers, banned, adapter):
        for i in range(server.start, min(server.end, coverage.num_blocks)):
            covered[i] = True
    return [i for i, ok in enumerate(covered) if not ok]


def choose_route(
    coverage: ModelCoverage,
    start: int = 0,
    end: int | None = None,
    *,
    banned: Collection[str] = (),
    latencies: Mapping[str, float] | None = None,
    measured_throughputs: Mapping[str, float] | None = None,
    jitter: float = 0.0,
    rng: random.Random | None = None,
    adapter: str | None = None,
) -> list[Hop]:
    """Cheapest chain covering [start, end): sum over hops of latency + blocks / throughput.

    ``measured_throughputs`` (blocks/s this client observed per peer) caps what servers announce, so a server
    that overstates its speed does not attract routes it cannot serve well.

    Dynamic programming over block boundaries; a server hosting [s, e) may serve any sub-span of it.
    ``jitter`` (0..1) randomises costs multiplicatively so concurrent sessions spread over redundant servers.
    With ``adapter``, only servers announcing that LoRA adapter take part.
    """
    end = coverage.num_blocks if end is None else end
    latencies = latencies or {}
    measured = measured_throughputs or {}
    rng = rng or random.Random()
    servers = [s for s in _usable(coverage.servers, banned, adapter) if s.start < end and s.end > start]
    # One noise factor per server (not per edge), so splitting one server's span into two hops never pays.
    noise = {s.peer_id: 1.0 + jitter * rng.random() for s in servers}
    # best[p] = (cost to have blocks [start, p) computed, previous hop)
    best: dict[int, tuple[float, Hop | None]] = {start: (0.0, None)}
    for pos in range(start, end):
        if pos not in best:
            continue
        base_cost = best[pos][0]
        for server in servers:
            if not server.start <= pos < server.end:
                continue
            hop_cost = latencies.get(server.peer_id, DEFAULT_HOP_LATENCY_S)
            # Trust an announcement only as far as this client has seen the server deliver.
            throughput = min(server.record.throughput, measured.get(server.peer_id, float("inf")))
            per_block = 1.0 / max(throughput, 1e-6)
            for stop in range(pos + 1, min(server.end, end) + 1):
                cost = base_cost + (hop_cost + (stop - pos) * per_block) * noise[server.peer_id]
                if stop not in best or cost < best[stop][0]:
                    best[stop] = (cost, Hop(server, pos, stop))
    if end not in best:
        missing = missing_blocks(coverage, banned, adapter) or list(range(start, end))
        raise MissingBlocksError(coverage.model_id if adapter is None else f"{coverage.model_id}:{adapter}", missing)
    route: list[Hop] = []
    pos = end
    while pos != start:
        hop = best[pos][1]
        assert hop is not None  # invariant of the DP, not input validation
        route.append(hop)
        pos = hop.start
    return route[::-1]


def _usable(servers: list[RemoteServer], banned: Collection[str], adapter: str | None = None) -> list[RemoteServer]:
    return [
        s
        for s in servers
        if s.record.state == ServerState.ONLINE
        and s.peer_id not in banned
        and (adapter is None or adapter in s.record.adapters)
    ]
