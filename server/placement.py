"""Pure choice of which blocks a new server should host: where the swarm is weakest."""

from __future__ import annotations

from swarm.records import ModelCoverage, ServerState


def block_throughputs(coverage: ModelCoverage, exclude_peer: str | None = None) -> list[float]:
    """Sum of announced throughput of online (or joining) servers, per block."""
    totals = [0.0] * coverage.num_blocks
    for server in coverage.servers:
        if server.peer_id == exclude_peer or server.record.state == ServerState.OFFLINE:
            continue
        for i in range(server.start, min(server.end, coverage.num_blocks)):
            totals[i] += server.record.throughput
    return totals


def choose_span(coverage: ModelCoverage, num_blocks: int, num_hosted: int) -> tuple[int, int]:
    """The window of ``num_hosted`` blocks whose weakest block is weakest (ties: least total, then leftmost)."""
    num_hosted = min(num_hosted, num_blocks)
    totals = block_throughputs(coverage) if coverage.num_blocks == num_blocks else [0.0] * num_blocks
    best_start = min(
        range(num_blocks - num_hosted + 1),
        key=lambda s: (min(totals[s : s + num_hosted]), sum(totals[s : s + num_hosted]), s),
    )
    return best_start, best_start + num_hosted
