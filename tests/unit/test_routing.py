"""Route choice and block placement are pure functions of what the DHT says."""

import random

import pytest

from server.placement import choose_span
from swarm.errors import MissingBlocksError
from swarm.records import ModelCoverage, RemoteServer, ServerRecord, ServerState
from swarm.routing import choose_route, missing_blocks


def server(peer: str, start: int, end: int, throughput: float = 100.0, state=ServerState.ONLINE) -> RemoteServer:
    record = ServerRecord(model_id="m", start=start, end=end, state=state, throughput=throughput)
    return RemoteServer(peer_id=peer, record=record)


def coverage(*servers: RemoteServer, num_blocks: int = 10) -> ModelCoverage:
    return ModelCoverage(model_id="m", num_blocks=num_blocks, servers=list(servers))


def spans(route):
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


def test_route_covers_all_blocks_in_order():
    route = choose_route(coverage(server("a", 0, 5), server("b", 5, 10)))
    assert spans(route) == [("a", 0, 5), ("b", 5, 10)]


def test_route_prefers_one_hop_when_a_server_has_everything():
    route = choose_route(coverage(server("a", 0, 5), server("b", 5, 10), server("full", 0, 10)))
    assert spans(route) == [("full", 0, 10)]


def test_route_uses_sub_spans_of_overlapping_servers():
    route = choose_route(coverage(server("a", 0, 7), server("b", 3, 10)))
    assert route[0].start == 0 and route[-1].end == 10
    assert all(left.end == right.start for left, right in zip(route, route[1:], strict=False))


def test_route_prefers_faster_servers():
    route = choose_route(coverage(server("slow", 0, 10, throughput=10), server("fast", 0, 10, throughput=1000)))
    assert spans(route) == [("fast", 0, 10)]


def test_banned_and_offline_servers_are_skipped():
    cov = coverage(server("a", 0, 10), server("b", 0, 10), server("c", 0, 10, state=ServerState.OFFLINE))
    assert spans(choose_route(cov, banned={"a"})) == [("b", 0, 10)]


def test_missing_blocks_are_named():
    cov = coverage(server("a", 0, 4), server("b", 6, 10))
    with pytest.raises(MissingBlocksError) as info:
        choose_route(cov)
    assert info.value.missing == [4, 5]
    assert "4:6" in str(info.value)
    assert missing_blocks(cov) == [4, 5]


def test_sub_range_route():
    route = choose_route(coverage(server("a", 0, 5), server("b", 5, 10)), 2, 7)
    assert spans(route) == [("a", 2, 5), ("b", 5, 7)]


def test_jitter_spreads_sessions_over_redundant_servers():
    cov = coverage(server("a", 0, 10), server("b", 0, 10))
    rng = random.Random(0)
    chosen = {choose_route(cov, jitter=0.5, rng=rng)[0].peer_id for _ in range(50)}
    assert chosen == {"a", "b"}


def test_new_server_takes_the_weakest_span():
    cov = coverage(server("a", 0, 10, throughput=50), server("b", 0, 4, throughput=50), num_blocks=10)
    assert choose_span(cov, 10, 3) == (4, 7)
    assert choose_span(coverage(num_blocks=0), 10, 4) == (0, 4)
    assert choose_span(coverage(num_blocks=10), 10, 20) == (0, 10)


def test_jitter_never_splits_one_server_into_two_hops():
    cov = coverage(server("a", 0, 15), server("b", 15, 30), num_blocks=30)
    rng = random.Random(1)
    for _ in range(100):
        assert spans(choose_route(cov, jitter=0.5, rng=rng)) == [("a", 0, 15), ("b", 15, 30)]


def test_measured_throughput_caps_what_a_server_announces():
    cov = coverage(server("boaster", 0, 10, throughput=10_000), server("honest", 0, 10, throughput=500))
    assert spans(choose_route(cov)) == [("boaster", 0, 10)]
    measured = {"boaster": 50.0}  # this client saw it deliver 50 blocks/s, not 10,000
    assert spans(choose_route(cov, measured_throughputs=measured)) == [("honest", 0, 10)]


def test_adapter_routes_use_only_servers_announcing_it():
    plain = server("fast", 0, 4, throughput=1000.0)
    a, b = server("a", 0, 2), server("b", 2, 4)
    for s in (a, b):
        s.record.adapters = ["mine"]
    coverage = ModelCoverage(model_id="m", num_blocks=4, servers=[plain, a, b])
    assert [h.peer_id for h in choose_route(coverage)] == ["fast"]
    assert [h.peer_id for h in choose_route(coverage, adapter="mine")] == ["a", "b"]
    with pytest.raises(MissingBlocksError, match="m:other"):
        choose_route(coverage, adapter="other")
    assert missing_blocks(coverage, adapter="other") == [0, 1, 2, 3]


def test_records_decode_adapters_tolerantly():
    wire = server("x", 0, 2).record.to_wire()
    assert ServerRecord.from_wire({**wire, "adapters": ["a", "b"]}).adapters == ["a", "b"]
    assert ServerRecord.from_wire({k: v for k, v in wire.items() if k != "adapters"}).adapters == []  # older servers
    assert ServerRecord.from_wire({**wire, "adapters": "garbage"}).adapters == []
    assert ServerRecord.from_wire({**wire, "adapters": ["ok", 3, None]}).adapters == ["ok"]
