"""Coverage summaries (swarm.status) and the text of `petals-server status` (server.status): pure functions."""

from __future__ import annotations

from server.status import SwarmStatus, coverage_bar, format_table, model_line, render_status, server_cells
from swarm.messages import ServerInfoResult
from swarm.probe import ProbeResult
from swarm.records import ModelCoverage, RemoteServer, ServerRecord, ServerState
from swarm.status import format_ranges, missing_ranges, readiness, summarize_coverage

MODEL = "smollm2-135m-instruct"


def server(peer: str, start: int, end: int, state: str = "online", throughput: float = 10.0, **kw) -> RemoteServer:
    record = ServerRecord(model_id=MODEL, start=start, end=end, state=ServerState(state), throughput=throughput, **kw)
    return RemoteServer(peer_id=peer, record=record)


def coverage(num_blocks: int, *servers: RemoteServer) -> ModelCoverage:
    covered = {i for s in servers if s.record.state == ServerState.ONLINE for i in range(s.start, s.end)}
    missing = [i for i in range(num_blocks) if i not in covered]
    return ModelCoverage(MODEL, num_blocks, servers=list(servers), missing=missing)


def test_missing_ranges_merge_and_sort():
    assert missing_ranges([]) == []
    assert missing_ranges([7, 2, 3, 4, 3]) == [(2, 5), (7, 8)]
    assert format_ranges([(2, 5), (7, 8)]) == "2:5, 7:8"


def test_summary_counts_online_servers_per_block_and_sums_throughput():
    summary = summarize_coverage(
        coverage(6, server("a", 0, 4, throughput=5), server("b", 2, 6, throughput=7), server("c", 0, 6, "offline"))
    )
    assert [b.servers for b in summary.blocks] == [1, 1, 2, 2, 1, 1]
    assert [b.throughput for b in summary.blocks] == [5, 5, 12, 12, 7, 7]
    assert summary.complete and summary.missing == ()
    assert (summary.servers_online, summary.servers_total) == (2, 3)
    assert summary.span_starts == (2, 4)
    assert readiness(summary) == "ready"


def test_summary_of_a_gap():
    summary = summarize_coverage(coverage(30, server("a", 0, 15), server("b", 17, 30)))
    assert not summary.complete
    assert summary.missing == ((15, 17),)
    assert summary.blocks_covered == 28
    assert readiness(summary) == "missing blocks 15:17"


def test_unannounced_model_reads_as_such():
    summary = summarize_coverage(ModelCoverage("nothing", 0))
    assert readiness(summary) == "not announced"
    assert coverage_bar(summary) == "[]"


def test_bar_marks_seams_and_gaps():
    two = summarize_coverage(coverage(8, server("a", 0, 4), server("b", 4, 8)))
    assert coverage_bar(two) == "[####|####]"
    gap = summarize_coverage(coverage(8, server("a", 0, 3), server("b", 5, 8)))
    assert coverage_bar(gap) == "[###|..|###]"


def test_bar_scales_long_models_and_never_hides_a_missing_block():
    summary = summarize_coverage(coverage(100, server("a", 0, 50), server("b", 51, 100)))
    bar = coverage_bar(summary, width=20)
    cells = bar.strip("[]").replace("|", "")
    assert len(cells) == 20
    assert cells.count(".") == 1  # block 50 is alone in its cell, but the cell still shows it missing


def test_model_line_reads_like_the_issue():
    summary = summarize_coverage(coverage(30, server("a", 0, 15), server("b", 15, 30)))
    line = model_line(summary)
    assert line.startswith(f"{MODEL}  [")
    assert line.endswith("]  30/30 blocks, 2 servers, ready")
    lone = summarize_coverage(coverage(30, server("a", 0, 15)))
    assert model_line(lone).endswith("15/30 blocks, 1 server, missing blocks 15:30")


def test_server_cells_prefer_live_probe_and_flag_unreachable():
    s = server("QmPeerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA1", 0, 15, public_name="alice", cache_tokens_left=100)
    info = ServerInfoResult(cache_tokens_left=42, active_sessions=3)
    live = server_cells(s, ProbeResult(s.peer_id, info, 0.0123))
    assert live[0] == "alice" and live[3] == "0:15" and live[4] == "online"
    assert live[6] == "42" and live[7] == "3" and live[8] == "12.3 ms"
    dead = server_cells(s, ProbeResult(s.peer_id, error="no answer in 2s"))
    assert dead[4] == "unreachable" and dead[6] == "100" and dead[7] == "-" and dead[8] == "-"
    assert server_cells(s, None)[4] == "online"  # not probed: the announced state stands


def test_format_table_aligns_columns():
    text = format_table(("A", "BB"), [("xxx", "1"), ("y", "22")])
    assert text.splitlines() == ["A    BB", "xxx  1", "y    22"]


def test_render_status_lists_models_then_servers():
    a, b = server("QmA" + "a" * 40, 0, 2, public_name="alice"), server("QmB" + "b" * 40, 2, 4, public_name="bob")
    status = SwarmStatus({MODEL: coverage(4, a, b)}, {})
    assert status.ready
    lines = render_status(status).splitlines()
    assert lines[0] == f"{MODEL}  [##|##]  4/4 blocks, 2 servers, ready"
    assert lines[1] == ""
    assert lines[2].split()[:5] == ["NAME", "PEER", "MODEL", "BLOCKS", "STATE"]
    assert lines[3].startswith("alice") and lines[4].startswith("bob")
    assert render_status(SwarmStatus({}, {})) == "no model is announced in this swarm"
    assert not SwarmStatus({}, {}).ready
