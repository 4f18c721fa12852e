"""A server's paged cache budget and idle timeout: a new session that finds the cache full waits for pages
(``--alloc-timeout-s``) and proceeds once another session ends, or is refused with a retryable error after the
timeout; closed and idle sessions free their pages, and the server keeps serving."""

from __future__ import annotations

import asyncio
import time

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
# 0.05 MiB at 1 KiB per token (4 blocks x 2 kv heads x 16 dims x keys+values x 4 bytes) holds 51 tokens, budgeted
# in whole pages of 16 tokens: 3 pages, 48 tokens. A 40-token session rounds up to all 3 pages.
BUDGET_TOKENS = 48
ALLOC_TIMEOUT_S = 0.6  # under the 1 s idle timeout, so the session holding the pages stays open meanwhile


@pytest.fixture(scope="module")
def model_id(tmp_path_factory):
    return "tiny-limits"


@pytest.fixture(scope="module")
def server(local_swarm, tmp_path_factory, model_id):
    folder = make_tiny_model("llama", tmp_path_factory.mktemp("models") / model_id)
    return local_swarm.start_server(
        str(folder), "0:4", "--cache-budget-mb", "0.05", "--session-idle-timeout-s", "1",
        "--kv-page-tokens", "16", "--alloc-timeout-s", str(ALLOC_TIMEOUT_S),
    )  # fmt: skip


@pytest.fixture
async def client(local_swarm, server):
    client = await SwarmClient.create(ClientConfig(initial_peers=local_swarm.initial_peers, max_retries=0))
    yield client
    await client.shutdown()


async def tokens_left(client: SwarmClient, peer_id: str) -> int:
    stub = BlockService.get_stub(client.p2p, client.peer(peer_id))
    info = await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=10)
    return ServerInfoResult.decode(info.metadata).cache_tokens_left


def _open_request(model_id: str, session_id: str) -> runtime_pb2.ExpertRequest:
    meta = InferenceStep(
        open=OpenSession(model_id=model_id, start=0, end=4, session_id=session_id, max_length=40), position=0
    )
    return runtime_pb2.ExpertRequest(tensors=[encode(torch.randn(1, 1, HIDDEN))], metadata=meta.encode())


async def test_full_cache_refuses_new_sessions_after_the_timeout_and_frees_memory(client, server, model_id):
    assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS
    async with client.inference_session(model_id, max_length=40) as session:
        await session.step(torch.randn(1, 3, HIDDEN))
        assert await tokens_left(client, server.peer_id) == 0  # 40 tokens round up to all three pages
        began = time.monotonic()
        refused = await stream_once(client, server.peer_id, _open_request(model_id, "x"))
        waited = time.monotonic() - began
        assert refused.error is not None and refused.error.code == ServerBusyError.code and refused.error.retryable
        assert "cache is full" in refused.error.message
        assert ALLOC_TIMEOUT_S <= waited < ALLOC_TIMEOUT_S + 5, waited  # it waited for pages, then gave up
        out = await session.step(torch.randn(1, 1, HIDDEN))  # the open session is unaffected
        assert out.shape == (1, 1, HIDDEN)
    await asyncio.sleep(0.2)
    assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS
    async with client.inference_session(model_id, max_length=40) as session:
        out = await session.step(torch.randn(1, 3, HIDDEN))
    assert out.shape == (1, 3, HIDDEN)


async def test_full_cache_queues_a_new_session_until_pages_free(client, server, model_id):
    first = client.inference_session(model_id, max_length=40)
    await first.open()
    await first.step(torch.randn(1, 3, HIDDEN))
    assert await tokens_left(client, server.peer_id) == 0
    queued = asyncio.ensure_future(stream_once(client, server.peer_id, _open_request(model_id, "queued")))
    await asyncio.sleep(ALLOC_TIMEOUT_S / 3)
    assert not queued.done()  # waiting for pages, neither refused nor served
    await first.close()  # gives its pages back: the queued session gets them and runs its step
    result = await asyncio.wait_for(queued, ALLOC_TIMEOUT_S)
    assert result.error is None and result.position == 1
    await asyncio.sleep(0.2)
    assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS  # the queued session's stream ended too


async def test_idle_session_is_closed_with_a_clear_error(client, server, model_id):
    async with client.inference_session(model_id, max_length=10) as session:
        await session.step(torch.randn(1, 2, HIDDEN))
        await asyncio.sleep(1.5)
        assert await tokens_left(client, server.peer_id) == BUDGET_TOKENS  # memory freed while idle
        with pytest.raises(SessionError, match="idle"):
            await session.step(torch.randn(1, 1, HIDDEN))
