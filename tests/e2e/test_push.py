"""Server-to-server push on a real three-server chain: each server sends its output straight to the next one.

Greedy tokens equal the local model's and the push-off path's; the servers' counters show the pushes happened.
When a push is refused (a server run with ``--accept-push false``) the client fills the step itself (and, after a
few such steps, stops asking for pushes to that server), and when a server on the route is killed
mid-generation the session fails over exactly as without push.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.client import ClientConfig, SwarmClient
from swarm.messages import PushRequest, RpcResult, ServerInfoResult
from swarm.model import AutoDistributedModelForCausalLM
from swarm.service import BlockService
from swarm.session import MAX_FILLS_IN_A_ROW
from swarm.tensors import encode
from tests.e2e import client_calls
from tests.helpers import greedy_reference, make_tiny_model

NEW_TOKENS = 12
FAIL_AT = 5
CHAIN = ("0:2", "2:3", "3:4")
ROUTE_ATTEMPTS = 10


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-push")


@pytest.fixture(scope="module")
def chain(local_swarm, folder):
    servers = [local_swarm.start_server(str(folder), span, wait=False) for span in CHAIN]
    for server in servers:
        local_swarm.wait_ready(server)
    return servers


@pytest.fixture(scope="module")
def expected(folder):
    return greedy_reference(folder, NEW_TOKENS, seed=5)


def distributed(local_swarm, folder, push: bool) -> AutoDistributedModelForCausalLM:
    # No spot-checks: a checked step is not pushed (its output must pass the check first), and these tests count
    # pushes exactly.
    config = ClientConfig(
        initial_peers=local_swarm.initial_peers, push=push, step_timeout_s=5.0, coverage_ttl_s=0.0,
        coverage_max_stale_s=0.0, spot_check_probability=0.0,
    )  # fmt: skip
    return AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=[], client_config=config)


def generate(model, input_ids: torch.Tensor, kill=None):
    """Greedy tokens step by step (``kill(session)`` runs before step FAIL_AT), and the session that made them."""
    tokens = input_ids
    with torch.inference_mode(), model.inference_session(max_length=input_ids.shape[1] + NEW_TOKENS) as session:
        new = input_ids
        for i in range(NEW_TOKENS):
            if i == FAIL_AT and kill is not None:
                kill(session.session)
            logits = model.head.logits(session.step(model.head.embed(new)), last_only=True)[:, -1]
            new = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, new], dim=1)
        return tokens, session.session


def server_info(model, peer_id: str) -> ServerInfoResult:
    return model._loop.run(client_calls.server_info(model.client, peer_id))


def test_push_chain_matches_local_and_push_off(local_swarm, folder, chain, expected):
    input_ids, expected_tokens = expected
    with_push, without_push = distributed(local_swarm, folder, True), distributed(local_swarm, folder, False)
    try:
        before = [server_info(with_push, s.peer_id) for s in chain]
        tokens_off, session_off = generate(without_push, input_ids)
        middle = [server_info(with_push, s.peer_id) for s in chain]
        tokens_on, session_on = generate(with_push, input_ids)
        after = [server_info(with_push, s.peer_id) for s in chain]
    finally:
        with_push.shutdown()
        without_push.shutdown()
    assert [hop.peer_id for hop in session_on.route] == [s.peer_id for s in chain]
    assert tokens_on.tolist() == expected_tokens.tolist()
    assert tokens_off.tolist() == expected_tokens.tolist()
    # Push off: nothing was pushed. Push on: every step but the opening one went server to server.
    assert [m.pushes_sent - b.pushes_sent for b, m in zip(before, middle, strict=True)] == [0, 0, 0]
    sent = [a.pushes_sent - m.pushes_sent for m, a in zip(middle, after, strict=True)]
    received = [a.inputs_pushed - m.inputs_pushed for m, a in zip(middle, after, strict=True)]
    filled = [a.inputs_filled - m.inputs_filled for m, a in zip(middle, after, strict=True)]
    # The first step opens the streams and is not pushed; every later one went server to server, none filled.
    assert sent[2] == 0 and received[0] == 0, "the first server gets its input from the client, the last pushes none"
    assert received[1:] == [NEW_TOKENS - 1] * 2 and filled == [0, 0, 0] and session_on.fills == 0
    assert min(sent[:2]) >= NEW_TOKENS - 2, "counted once acknowledged: the very last may still be on its way"


def test_refused_push_falls_back_to_the_client(local_swarm, folder, chain, expected):
    """A route through a server that refuses pushes: the client fills that server's first pushed steps, then
    sends it its inputs directly."""
    input_ids, expected_tokens = expected
    refusing = local_swarm.start_server(str(folder), "2:4", "--accept-push", "false")
    model = distributed(local_swarm, folder, True)
    try:
        for _ in range(ROUTE_ATTEMPTS):  # the shorter route through it is preferred, but latency noise may differ
            tokens, session = generate(model, input_ids)
            if refusing.peer_id in [hop.peer_id for hop in session.route]:
                break
            time.sleep(0.3)  # fresh latency samples
        info = server_info(model, refusing.peer_id)
        route = [hop.peer_id for hop in session.route]
    finally:
        model.shutdown()
        refusing.signal(signal.SIGTERM)
        refusing.process.wait(timeout=30)
    assert refusing.peer_id in route
    assert tokens.tolist() == expected_tokens.tolist()
    assert info.inputs_pushed == 0 and info.inputs_filled == MAX_FILLS_IN_A_ROW
    assert session.fills == MAX_FILLS_IN_A_ROW


async def test_pushes_are_validated(local_swarm, chain):
    """Pushes for no open session, of a wrong shape, or without tensors are refused with structured errors."""
    client = await SwarmClient.create(ClientConfig(initial_peers=local_swarm.initial_peers, spot_check_probability=0.0))
    stub = BlockService.get_stub(client.p2p, client.peer(chain[2].peer_id))

    async def push(meta: bytes, *tensors: torch.Tensor) -> RpcResult:
        request = runtime_pb2.ExpertRequest(tensors=[encode(t) for t in tensors], metadata=meta)
        return RpcResult.decode((await stub.rpc_push(request, timeout=10)).metadata)

    try:
        unknown = PushRequest(session_id="nope", client_peer_id=client.peer_id, start=3, seq=1, position=0)
        assert (await push(unknown.encode(), torch.randn(1, 1, 64))).error.code == "session_error"
        assert (await push(b"{not json", torch.randn(1, 1, 64))).error.code == "bad_request"
        assert (await push(unknown.encode())).error.code in ("session_error", "bad_request")
        async with client.inference_session("tiny-push", max_length=8) as session:
            await session.step(torch.randn(1, 2, 64))
            assert session.route[-1].peer_id == chain[2].peer_id, "only the chain's last server hosts block 3"
            sid = session.session_id
            meta = PushRequest(session_id=sid, client_peer_id=client.peer_id, start=3, seq=9, position=2)
            assert (await push(meta.encode(), torch.randn(1, 1, 65))).error.code == "bad_request"
            assert (await push(meta.encode(), torch.randn(2, 1, 64))).error.code == "bad_request"
            assert (await push(meta.encode(), torch.full((1, 1, 64), float("nan")))).error.code == "bad_request"
            out = await session.step(torch.randn(1, 1, 64))  # the session is unharmed
        assert out.shape == (1, 1, 64) and torch.isfinite(out).all()
        await asyncio.sleep(0.5)
        info = ServerInfoResult.decode((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=10)).metadata)
        assert info.active_sessions == 0
    finally:
        await client.shutdown()


def test_failover_with_push(local_swarm, folder, chain, expected):
    """The last server of the route dies (SIGKILL) mid-generation; its blocks move to other servers, whose inputs
    are pushed again from the next step on. Runs last: it kills a server of the chain or an extra one."""
    input_ids, expected_tokens = expected
    extra = local_swarm.start_server(str(folder), "2:4")
    servers = {s.peer_id: s for s in (*chain, extra)}
    model = distributed(local_swarm, folder, True)
    killed: list[str] = []

    def kill(session) -> None:
        killed.append(session.route[-1].peer_id)
        servers[killed[0]].signal(signal.SIGKILL)
        time.sleep(0.5)  # a real generation keeps going at its own pace

    try:
        before = {peer: server_info(model, peer) for peer in servers}
        tokens, session = generate(model, input_ids, kill=kill)
        route = [hop.peer_id for hop in session.route]
        after = {peer: server_info(model, peer) for peer in route}
    finally:
        model.shutdown()
    assert tokens.tolist() == expected_tokens.tolist()
    assert session.failovers >= 1 and killed[0] not in route
    pushed = [after[peer].inputs_pushed - before[peer].inputs_pushed for peer in route[1:]]
    assert min(pushed) >= NEW_TOKENS - FAIL_AT - 1, "steps after the failover step are pushed again"
