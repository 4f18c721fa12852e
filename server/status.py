"""`petals-server status`: join the DHT as a client, print each model's coverage bar and a servers table, exit.

    smollm2-135m-instruct  [###############|###############]  30/30 blocks, 2 servers, ready

The text is made by pure functions (``coverage_bar``, ``model_line``, ``servers_table``, ``render_status``);
only ``collect_status`` touches the network.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from swarm.probe import PROBE_TIMEOUT_S, ProbeResult
from swarm.records import ModelCoverage, RemoteServer, ServerState
from swarm.status import CoverageSummary, readiness, summarize_coverage

BAR_WIDTH = 48
SERVER_COLUMNS = (
    "NAME", "PEER", "MODEL", "BLOCKS", "STATE", "THROUGHPUT", "CACHE TOKENS", "SESSIONS", "LATENCY", "VERSION",
    "DEVICE",
)  # fmt: skip


@dataclass(frozen=True)
class SwarmStatus:
    """What the swarm looked like: coverage per model (announced, or asked for) and each server's probe."""

    coverages: dict[str, ModelCoverage]
    probes: dict[str, ProbeResult]

    @property
    def ready(self) -> bool:
        return bool(self.coverages) and all(c.complete for c in self.coverages.values())


def coverage_bar(summary: CoverageSummary, width: int = BAR_WIDTH) -> str:
    """'[####|####]': '#' covered, '.' missing, '|' where one server's span meets another's.

    Models with more blocks than ``width`` are scaled: a cell is '#' only if every block it stands for is covered.
    """
    n = summary.num_blocks
    if n == 0:
        return "[]"
    cells = min(n, width)
    seams = {round(seam * cells / n) for seam in summary.span_starts}
    out = []
    for cell in range(cells):
        lo, hi = cell * n // cells, (cell + 1) * n // cells
        if cell in seams and cell > 0:
            out.append("|")
        covered = all(summary.blocks[i].servers > 0 for i in range(lo, max(hi, lo + 1)))
        out.append("#" if covered else ".")
    return "[" + "".join(out) + "]"


def model_line(summary: CoverageSummary, name_width: int = 0) -> str:
    """'<model>  [bar]  28/30 blocks, 1 server, missing blocks 15:17'."""
    servers = summary.servers_online
    counts = f"{summary.blocks_covered}/{summary.num_blocks} blocks, {servers} server{'' if servers == 1 else 's'}"
    return f"{summary.model_id:<{name_width}}  {coverage_bar(summary)}  {counts}, {readiness(summary)}"


def server_cells(server: RemoteServer, probe: ProbeResult | None) -> tuple[str, ...]:
    """One row of the servers table (strings, in ``SERVER_COLUMNS`` order)."""
    record = server.record
    info = probe.info if probe else None
    state = record.state.value
    if record.state == ServerState.ONLINE and probe is not None and info is None:
        state = "unreachable"
    latency = f"{probe.latency_s * 1000:.1f} ms" if probe and probe.latency_s is not None else "-"
    return (
        record.public_name or "-",
        "..." + server.peer_id[-10:],
        record.model_id,
        f"{record.start}:{record.end}",
        state,
        f"{record.throughput:.1f}/s",
        str(info.cache_tokens_left if info else record.cache_tokens_left),
        str(info.active_sessions) if info else "-",
        latency,
        record.version or "-",
        f"{record.device}/{record.dtype}",
    )


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces, no trailing blanks."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=True)) for row in [headers, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def servers_table(coverages: Mapping[str, ModelCoverage], probes: Mapping[str, ProbeResult]) -> str:
    servers = [server for coverage in coverages.values() for server in coverage.servers]
    if not servers:
        return "no servers announce themselves"
    servers.sort(key=lambda s: (s.record.model_id, s.start, s.end, s.record.public_name or "", s.peer_id))
    return format_table(SERVER_COLUMNS, [server_cells(s, probes.get(s.peer_id)) for s in servers])


def render_status(status: SwarmStatus) -> str:
    """The whole report: one coverage line per model, a blank line, the servers table."""
    if not status.coverages:
        return "no model is announced in this swarm"
    summaries = [summarize_coverage(status.coverages[m]) for m in sorted(status.coverages)]
    width = max(len(s.model_id) for s in summaries)
    lines = [model_line(summary, width) for summary in summaries]
    return "\n".join([*lines, "", servers_table(status.coverages, status.probes)])


async def collect_status(
    initial_peers: list[str], model_id: str | None = None, probe_timeout_s: float = PROBE_TIMEOUT_S
) -> SwarmStatus:
    """Join as a DHT client, read coverage (of ``model_id`` or of every announced model), probe each server."""
    from swarm.client import ClientConfig, SwarmClient
    from swarm.probe import probe_servers

    client = await SwarmClient.create(ClientConfig(initial_peers=initial_peers))
    try:
        if model_id is None:
            coverages = await client.served_models()
        else:
            coverages = {model_id: await client.model_coverage(model_id, fresh=True)}
        peers = [server.peer_id for coverage in coverages.values() for server in coverage.servers]
        probes = await probe_servers(client.p2p, peers, probe_timeout_s)
    finally:
        await client.shutdown()
    return SwarmStatus(coverages, probes)


def run_status(initial_peers: list[str], model_id: str | None, probe_timeout_s: float) -> int:
    """Print the report; exit status 0 when every shown model is fully served, else 1."""
    status = asyncio.run(collect_status(initial_peers, model_id, probe_timeout_s))
    print(render_status(status), flush=True)
    return 0 if status.ready else 1
