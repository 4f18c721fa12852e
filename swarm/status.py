"""Coverage summaries for people (dashboard, ``petals-server status``): per-block redundancy and missing ranges.

Pure functions over ``swarm.records.ModelCoverage``; nothing here talks to the network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from swarm.records import ModelCoverage, ServerState


@dataclass(frozen=True)
class BlockLoad:
    """Who serves one block: online servers and their summed throughput (blocks-forward/s per token)."""

    servers: int
    throughput: float


@dataclass(frozen=True)
class CoverageSummary:
    """One model's coverage, ready to draw."""

    model_id: str
    num_blocks: int
    blocks: tuple[BlockLoad, ...]
    missing: tuple[tuple[int, int], ...]
    """Half-open ranges of blocks that no online server covers."""
    servers_online: int
    servers_total: int
    span_starts: tuple[int, ...]
    """Where online servers' spans start or end (inside the model): the seams of the coverage bar."""

    @property
    def complete(self) -> bool:
        return self.num_blocks > 0 and not self.missing

    @property
    def blocks_covered(self) -> int:
        return sum(1 for block in self.blocks if block.servers > 0)


def summarize_coverage(coverage: ModelCoverage) -> CoverageSummary:
    """Per-block counts and throughput of online servers; ``missing`` follows ``coverage.missing``."""
    servers = [0] * coverage.num_blocks
    throughput = [0.0] * coverage.num_blocks
    seams: set[int] = set()
    online = 0
    for server in coverage.servers:
        record = server.record
        if record.state != ServerState.ONLINE:
            continue
        online += 1
        seams.update(i for i in (record.start, record.end) if 0 < i < coverage.num_blocks)
        for i in range(record.start, min(record.end, coverage.num_blocks)):
            servers[i] += 1
            throughput[i] += record.throughput
    return CoverageSummary(
        model_id=coverage.model_id,
        num_blocks=coverage.num_blocks,
        blocks=tuple(BlockLoad(n, t) for n, t in zip(servers, throughput, strict=True)),
        missing=tuple(missing_ranges(coverage.missing)),
        servers_online=online,
        servers_total=len(coverage.servers),
        span_starts=tuple(sorted(seams)),
    )


def missing_ranges(indices: Iterable[int]) -> list[tuple[int, int]]:
    """[2, 3, 4, 7] -> [(2, 5), (7, 8)]: sorted, merged half-open ranges."""
    ranges: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if ranges and ranges[-1][1] == i:
            ranges[-1] = (ranges[-1][0], i + 1)
        else:
            ranges.append((i, i + 1))
    return ranges


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """[(2, 5), (7, 8)] -> '2:5, 7:8' (the same START:END as ``--block-indices``)."""
    return ", ".join(f"{start}:{end}" for start, end in ranges)


def readiness(summary: CoverageSummary) -> str:
    """'ready', 'missing blocks 2:5, 7:8', or 'not announced' for a model without blocks."""
    if summary.num_blocks == 0:
        return "not announced"
    if summary.complete:
        return "ready"
    return f"missing blocks {format_ranges(summary.missing)}"
