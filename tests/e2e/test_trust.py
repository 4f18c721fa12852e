"""Trust in an open swarm, on a real loopback swarm (tiny Llama, 4 blocks): records announced on another peer's
behalf are refused by the DHT and ignored by clients; a server returning corrupted activations is caught by
spot-checks, banned and routed around, and the generation's tokens equal the model run locally."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from hivemind import DHT
from hivemind.utils import get_dht_time

from swarm.client import ClientConfig, SwarmClient
from swarm.ids import ModelId, block_key
from swarm.model import AutoDistributedModelForCausalLM
from swarm.records import ServerRecord, ServerState
from tests.helpers import greedy_reference, make_tiny_model, reference_model

MODEL_ID = "tiny-trust"
NEW_TOKENS = 8
HONEST_STEPS = 3
"""The liar answers each session's first steps honestly, so it is caught mid-generation and the failover replays."""
PIN_S = 1.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / MODEL_ID)


@pytest.fixture(scope="module")
def servers(local_swarm, folder):
    """Two honest servers of the whole model and a liar that returns noise (after a few honest inference steps per
    session) and claims to be far faster."""
    children = {
        "honest_a": local_swarm.start_server(str(folder), "0:4", wait=False),
        "honest_b": local_swarm.start_server(str(folder), "0:4", wait=False),
        "liar": local_swarm.start_server(
            str(folder),
            "0:4",
            wait=False,
            module="tests.e2e.corrupt_server",
            module_args=("--honest-steps", str(HONEST_STEPS)),
        ),  # fmt: skip
    }
    for child in children.values():
        local_swarm.wait_ready(child)
    return children


def client_config(local_swarm, **overrides) -> ClientConfig:
    return ClientConfig(
        initial_peers=local_swarm.initial_peers, route_jitter=0.0, coverage_ttl_s=0.0, coverage_max_stale_s=0.0,
        **overrides,
    )  # fmt: skip


async def wait_for_coverage(client: SwarmClient, peers: set[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while {s.peer_id for s in (await client.model_coverage(MODEL_ID, fresh=True)).servers} != peers:
        assert time.monotonic() < deadline, "servers did not all appear in the DHT"
        await asyncio.sleep(0.2)


async def test_records_announced_on_another_peers_behalf_are_ignored(local_swarm, servers):
    victim = servers["honest_a"].peer_id
    rogue = await asyncio.to_thread(DHT, initial_peers=local_swarm.initial_peers, client_mode=True, start=True)
    client = await SwarmClient.create(client_config(local_swarm, spot_check_probability=0.0))
    try:
        await wait_for_coverage(client, {c.peer_id for c in servers.values()})
        # The victim "goes offline" and a fake peer "serves" everything at a huge speed, each record written by
        # the rogue (unsigned, or signed-looking with the victim's public key copied from its real record).
        real = next(s for s in (await client.model_coverage(MODEL_ID)).servers if s.peer_id == victim)
        offline = ServerRecord(model_id=MODEL_ID, start=0, end=4, state=ServerState.OFFLINE).to_wire()
        copied_key = {**offline, "public_key": real.record.public_key, "signed_at": time.time(), "signature": "AAAA"}
        fake = ServerRecord(model_id=MODEL_ID, start=0, end=4, state=ServerState.ONLINE, throughput=1e9).to_wire()
        forgeries = [(victim, offline), (victim, copied_key), ("QmFakePeerThatServesEverything", fake)]
        expiration = get_dht_time() + 600
        for subkey, value in forgeries:
            for block in range(4):
                stored = rogue.store(block_key(ModelId(MODEL_ID), block), value, expiration, subkey=subkey)
                assert not stored, "the swarm's DHT nodes refuse records not signed by the peer they name"
        for _ in range(3):  # and the client still sees the swarm as the servers announced it
            coverage = await client.model_coverage(MODEL_ID, fresh=True)
            assert {s.peer_id for s in coverage.servers} == {c.peer_id for c in servers.values()}
            assert all(s.record.state == ServerState.ONLINE for s in coverage.servers)
            assert coverage.complete
            await asyncio.sleep(1.0)
    finally:
        await client.shutdown()
        await asyncio.to_thread(rogue.shutdown)


@pytest.fixture(scope="module")
def expected(folder):
    return greedy_reference(folder, NEW_TOKENS, seed=5)


def test_spot_check_bans_a_corrupting_server_and_tokens_are_unchanged(local_swarm, servers, folder, expected):
    liar = servers["liar"].peer_id
    config = client_config(local_swarm, spot_check_probability=1.0, ban_s=PIN_S)
    model = AutoDistributedModelForCausalLM.from_pretrained(str(folder), initial_peers=[], client_config=config)
    try:
        model._loop.run(wait_for_coverage(model.client, {c.peer_id for c in servers.values()}))
        input_ids, expected_tokens = expected
        tokens, new = input_ids, input_ids
        # Pin the session's route to the liar (its overstated speed attracts routes, but loopback latency noise
        # can outweigh it): the honest servers are briefly banned while the session opens, then free to check.
        for name in ("honest_a", "honest_b"):
            model.client.bans.ban(servers[name].peer_id)
        session = model.inference_session(max_length=input_ids.shape[1] + NEW_TOKENS)
        with torch.inference_mode(), session:
            assert [hop.peer_id for hop in session.session.route] == [liar]
            time.sleep(PIN_S + 0.1)
            for i in range(NEW_TOKENS):
                if i < HONEST_STEPS:
                    assert [hop.peer_id for hop in session.session.route] == [liar], "not caught while honest"
                logits = model.head.logits(session.step(model.head.embed(new)), last_only=True)[:, -1]
                new = logits.argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, new], dim=1)
            assert liar not in [hop.peer_id for hop in session.session.route]
            assert session.session.failovers == 1
        stats = model.client.spot_checks
        assert stats.banned == {liar}
        assert stats.checks >= NEW_TOKENS + 1 and stats.mismatches == 1 and stats.unresolved == 0  # no false alarms
        assert tokens.tolist() == expected_tokens.tolist()
    finally:
        model.shutdown()


async def test_spot_check_catches_the_liar_in_a_stateless_forward(local_swarm, servers, folder):
    liar = servers["liar"].peer_id
    client = await SwarmClient.create(client_config(local_swarm, spot_check_probability=1.0))
    try:
        await wait_for_coverage(client, {c.peer_id for c in servers.values()})
        reference = reference_model(folder)
        input_ids = torch.tensor([[3, 14, 15, 92, 6, 5]])
        with torch.no_grad():
            want = reference(input_ids, output_hidden_states=True).hidden_states[-1]
            # Every hop is checked: the liar, on the route or picked as a checker, is caught within a few passes
            # (each pass it takes part with probability 1/2 or more); outputs are right all along.
            for _ in range(20):
                out = await client.forward(MODEL_ID, reference.model.embed_tokens(input_ids))
                torch.testing.assert_close(reference.model.norm(out), want, atol=1e-4, rtol=1e-4)
                if client.spot_checks.banned:
                    break
        assert client.spot_checks.banned == {liar}
        assert client.spot_checks.mismatches == 1 and client.spot_checks.unresolved == 0
        out = await client.forward(MODEL_ID, reference.model.embed_tokens(input_ids))
        assert client.spot_checks.mismatches == 1, "the banned liar takes no further part"
    finally:
        await client.shutdown()
