"""Rebalancing decisions: move to uncovered or much weaker blocks, never flip-flop over small gains."""

from server.rebalance import plan_move
from swarm.records import ModelCoverage, RemoteServer, ServerRecord, ServerState


def server(peer: str, start: int, end: int, throughput: float = 100.0) -> RemoteServer:
    record = ServerRecord(model_id="m", start=start, end=end, state=ServerState.ONLINE, throughput=throughput)
    return RemoteServer(peer_id=peer, record=record)


def coverage(*servers: RemoteServer, num_blocks: int = 4) -> ModelCoverage:
    return ModelCoverage(model_id="m", num_blocks=num_blocks, servers=list(servers))


def test_servers_piled_on_one_span_spread_out():
    cov = coverage(server("a", 0, 2), server("b", 0, 2), server("c", 0, 2))
    assert plan_move(cov, "a", (0, 2), 100.0, margin=0.2) == (2, 4)


def test_no_move_when_the_swarm_is_balanced():
    cov = coverage(server("a", 0, 2), server("b", 2, 4))
    assert plan_move(cov, "a", (0, 2), 100.0, margin=0.2) is None


def test_small_gains_do_not_cause_a_move():
    # a (10/s) could move from 0:2 to 2:4, lifting the bottleneck from 95 to 100 only: under the 20% margin
    cov = coverage(server("a", 0, 2, 10), server("b", 0, 2, 100), server("c", 2, 4, 95), server("d", 4, 6, 200),
                   num_blocks=6)  # fmt: skip
    assert plan_move(cov, "a", (0, 2), 10.0, margin=0.2) is None


def test_large_gains_do():
    cov = coverage(server("a", 0, 2, 10), server("b", 0, 2, 100), server("c", 2, 4, 20), server("d", 4, 6, 200),
                   num_blocks=6)  # fmt: skip
    assert plan_move(cov, "a", (0, 2), 10.0, margin=0.2) == (2, 4)


def test_moving_back_is_never_worth_it_right_after_a_move():
    before = coverage(server("a", 0, 2), server("b", 0, 2), server("c", 0, 2))
    assert plan_move(before, "a", (0, 2), 100.0, margin=0.2) == (2, 4)
    after = coverage(server("a", 2, 4), server("b", 0, 2), server("c", 0, 2))
    assert plan_move(after, "a", (2, 4), 100.0, margin=0.2) is None
    assert plan_move(after, "b", (0, 2), 100.0, margin=0.2) is None
