"""A server's cache budget and idle timeout: full caches refuse new sessions with a retryable error, closed and
idle sessions free their memory, and the server keeps serving."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.client import ClientConfig, SwarmClient
from swarm.errors import ServerBusyError, SessionError
from swarm.messages import InferenceStep, OpenSession, ServerInfoResult
from swarm.service import BlockService
from swarm.tensors import encode
from tests.e2e.harness import stream_once
from tests.helpers import make_tiny_model

HIDDEN = 64
BUDGET_TOKENS = 51  # 0.05 MiB at 1 KiB per token (4 blocks x 2 kv heads x 16 dims x keys+values x 4 bytes)


@pytest.fixture(scope="module")
def model_id(tmp_path_factory):
    return "tiny-limits"


@pytest.fixture(scope="module")
def server(local_swarm, tmp_path_factory, model_id):
    folder = make_tiny_model("llama", tmp_path_factory.mktemp("models") / model_id)
    return local_swarm.start_server(str(folder), "0:4", "--cache-budget-mb", "0.05", "--session-idle-timeout-s", "1")


@pytest.fixture
async def client(local_swarm, server):
    client = await SwarmClient.create(ClientConfig(initial_peers=local_swarm.initial_peers, max_retries=0))
    yield client
    await client.shutdown()


async def tokens_left(client: SwarmClient, peer_id: str) -> int:
    stub = BlockService.get_stub(client.p2p, client.peer(peer_id))
    info = await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=10)
    return ServerInfoResult.decode(info.metadata).cache_tokens_left


async def test_full_cache_refuses_new_sessions_and_frees_memory(client, server, model_id):
    assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS
    async with client.inference_session(model_id, max_length=40) as session:
        await session.step(torch.randn(1, 3, HIDDEN))
        assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS - 40
        meta = InferenceStep(
            open=OpenSession(model_id=model_id, start=0, end=4, session_id="x", max_length=40), position=0
        )
        request = runtime_pb2.ExpertRequest(tensors=[encode(torch.randn(1, 1, HIDDEN))], metadata=meta.encode())
        refused = await stream_once(client, server.peer_id, request)
        assert refused.error is not None and refused.error.code == ServerBusyError.code and refused.error.retryable
        assert "cache is full" in refused.error.message
    await asyncio.sleep(0.2)
    assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS
    async with client.inference_session(model_id, max_length=40) as session:
        out = await session.step(torch.randn(1, 3, HIDDEN))
    assert out.shape == (1, 3, HIDDEN)


async def test_idle_session_is_closed_with_a_clear_error(client, server, model_id):
    async with client.inference_session(model_id, max_length=10) as session:
        await session.step(torch.randn(1, 2, HIDDEN))
        await asyncio.sleep(1.5)
        assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS  # memory freed while idle
        with pytest.raises(SessionError, match="idle"):
            await session.step(torch.randn(1, 1, HIDDEN))
