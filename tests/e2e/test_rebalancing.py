"""Servers started with --blocks spread out: three servers that start together all pick the same (empty) span
first; after the rebalancing period every block is covered, and the swarm then stays put (no flip-flopping)."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarm.client import ClientConfig, SwarmClient
from tests.helpers import make_tiny_model

MODEL_ID = "tiny-rebalance"


@pytest.fixture(scope="module")
def servers(local_swarm, tmp_path_factory):
    folder = make_tiny_model("llama", tmp_path_factory.mktemp("models") / MODEL_ID)
    flags = ("--blocks", "2", "--rebalance-period-s", "2", "--announce-period-s", "1")
    children = [local_swarm.start_server(str(folder), None, *flags, wait=False) for _ in range(3)]
    for child in children:
        local_swarm.wait_ready(child)
    return children


async def _coverage(client: SwarmClient):
    return await client.model_coverage(MODEL_ID, fresh=True)


async def test_servers_started_on_one_span_spread_over_all_blocks(local_swarm, servers):
    initial = {(child.info["start"], child.info["end"]) for child in servers}
    client = await SwarmClient.create(ClientConfig(initial_peers=local_swarm.initial_peers))
    try:
        deadline = time.monotonic() + 40
        coverage = await _coverage(client)
        while not coverage.complete and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            coverage = await _coverage(client)
        assert coverage.complete, f"blocks {coverage.missing} still uncovered; servers started on {initial}"
        if len(initial) == 1:  # they all started on one span: somebody must have moved
            assert any("rebalancing: now serving" in child.log() for child in servers)
        # Once settled, the placement covers both halves and stays put: no flip-flopping.
        await asyncio.sleep(6)
        settled = await _coverage(client)
        online = sorted((s.start, s.end) for s in settled.servers if s.record.state.value == "online")
        assert settled.complete and (0, 2) in online and (2, 4) in online
        await asyncio.sleep(6)
        later = await _coverage(client)
        assert later.complete
        assert sorted((s.start, s.end) for s in later.servers if s.record.state.value == "online") == online
    finally:
        await client.shutdown()
