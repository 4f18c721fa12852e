"""Per-peer admission on a real server (tiny Llama): one peer's sessions are capped (``--max-sessions-per-peer``)
with a retryable ServerBusyError while another peer is still served, and a peer that holds more than its fair
share of the cache (``--max-cache-share``) may not take more while another peer waits for pages."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.client import ClientConfig, SwarmClient
from swarm.errors import ServerBusyError
from swarm.messages import InferenceStep, OpenSession
from swarm.tensors import encode
from tests.e2e.harness import stream_once
from tests.e2e.test_server_limits import HIDDEN
from tests.helpers import make_tiny_model

ALLOC_TIMEOUT_S = 3.0


def open_request(model_id: str, session_id: str, max_length: int = 40) -> runtime_pb2.ExpertRequest:
    meta = InferenceStep(
        open=OpenSession(model_id=model_id, start=0, end=4, session_id=session_id, max_length=max_length), position=0
    )
    return runtime_pb2.ExpertRequest(tensors=[encode(torch.randn(1, 1, HIDDEN))], metadata=meta.encode())


@pytest.fixture(scope="module")
def model_id():
    return "tiny-peer-limits"


@pytest.fixture(scope="module")
def server(local_swarm, tmp_path_factory, model_id):
    folder = make_tiny_model("llama", tmp_path_factory.mktemp("models") / model_id)
    # 0.1 MiB at 1 KiB per token: 6 pages of 16 tokens. A 40-token session takes 3 pages, half the cache.
    return local_swarm.start_server(
        str(folder), "0:4", "--cache-budget-mb", "0.1", "--kv-page-tokens", "16",
        "--max-sessions-per-peer", "2", "--max-cache-share", "0.5", "--alloc-timeout-s", str(ALLOC_TIMEOUT_S),
    )  # fmt: skip


@pytest.fixture
async def clients(local_swarm, server):
    """Two clients, i.e. two peers."""
    made = [
        await SwarmClient.create(ClientConfig(initial_peers=local_swarm.initial_peers, max_retries=0)) for _ in range(2)
    ]
    yield made
    for client in made:
        await client.shutdown()


async def test_sessions_per_peer_are_capped_and_other_peers_still_served(clients, server, model_id):
    alice, bob = clients
    async with (
        alice.inference_session(model_id, max_length=8) as s1,
        alice.inference_session(model_id, max_length=8) as s2,
    ):
        await s1.step(torch.randn(1, 2, HIDDEN))
        await s2.step(torch.randn(1, 2, HIDDEN))
        refused = await stream_once(alice, server.peer_id, open_request(model_id, "third"))
        assert refused.error is not None and refused.error.code == ServerBusyError.code and refused.error.retryable
        assert "limit per peer is 2" in refused.error.message
        async with bob.inference_session(model_id, max_length=8) as other:  # another peer is served
            assert (await other.step(torch.randn(1, 2, HIDDEN))).shape == (1, 2, HIDDEN)
    await asyncio.sleep(0.2)
    async with alice.inference_session(model_id, max_length=8) as again:  # room again once sessions closed
        assert (await again.step(torch.randn(1, 1, HIDDEN))).shape == (1, 1, HIDDEN)


async def test_a_greedy_peer_is_held_to_its_share_while_another_waits(clients, server, model_id):
    alice, bob = clients
    greedy = alice.inference_session(model_id, max_length=80)  # 5 of 6 pages: over alice's share of 3, allowed
    await greedy.open()  # while nobody else wants pages
    await greedy.step(torch.randn(1, 2, HIDDEN))
    bob_waits = asyncio.ensure_future(stream_once(bob, server.peer_id, open_request(model_id, "bob")))  # 3 pages
    await asyncio.sleep(0.5)
    assert not bob_waits.done()  # only one page is free: bob waits
    small = open_request(model_id, "small", max_length=16)  # one page, which is free
    refused = await stream_once(alice, server.peer_id, small)
    assert refused.error is not None and refused.error.code == ServerBusyError.code and refused.error.retryable
    assert "fair share is 50%" in refused.error.message
    await greedy.close()
    result = await asyncio.wait_for(bob_waits, ALLOC_TIMEOUT_S)
    assert result.error is None and result.position == 1  # bob got the pages
