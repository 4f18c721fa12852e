"""Continuous batching on a real loopback swarm (tiny Llama, two servers): sessions with different prompt lengths
stepping at the same time give exactly the greedy tokens each gives alone, and the servers really ran their
steps together (their ``rpc_info`` counters say so)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.client import ClientConfig, SwarmClient
from swarm.head import ModelHead
from swarm.weights import resolve_model
from tests.e2e.client_calls import greedy_session, server_info
from tests.helpers import make_tiny_model

NEW_TOKENS = 8
# (batch rows, prompt length): one prompt longer than the servers' prefill chunk, one session of two rows.
SESSIONS = [(1, 3), (1, 11), (2, 5), (1, 20), (1, 1)]
# A wait makes batching sure, even on a busy machine.
SERVER_FLAGS = ("--batch-wait-ms", "50", "--prefill-chunk-tokens", "8")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / "tiny-batching")


@pytest.fixture(scope="module")
def servers(local_swarm, model_folder):
    started = [local_swarm.start_server(str(model_folder), span, *SERVER_FLAGS, wait=False) for span in ("0:2", "2:4")]
    for server in started:
        local_swarm.wait_ready(server)
    return started


@pytest.fixture(scope="module")
def head(model_folder, tmp_path_factory):
    return ModelHead.load(resolve_model(str(model_folder), tmp_path_factory.mktemp("cache")))


@pytest.fixture
async def client(local_swarm, servers):
    client = await SwarmClient.create(ClientConfig(initial_peers=local_swarm.initial_peers, max_retries=0))
    yield client
    await client.shutdown()


async def greedy(client: SwarmClient, head: ModelHead, prompt: torch.Tensor) -> list[list[int]]:
    """prompt: [B, S] ids -> NEW_TOKENS greedy tokens per row, one swarm session."""
    return await greedy_session(client, head, "tiny-batching", prompt, NEW_TOKENS)


async def test_concurrent_sessions_are_batched_and_match_lone_runs(client, servers, head):
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 128, (b, s), generator=g) for b, s in SESSIONS]
    alone = [await greedy(client, head, p) for p in prompts]
    before = [await server_info(client, s.peer_id) for s in servers]
    assert all(info.max_batch_sessions_seen <= 1 for info in before)  # one at a time so far

    together = await asyncio.gather(*(greedy(client, head, p) for p in prompts))

    assert together == alone
    for server in servers:
        info = await server_info(client, server.peer_id)
        assert info.max_batch_sessions_seen >= 3, (server.name, info)
        assert info.max_batch_rows_seen >= info.max_batch_sessions_seen
        assert info.batched_steps > 0
        assert "batched" in server.log()
