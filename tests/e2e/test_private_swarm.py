"""Private swarms on a real loopback swarm (tiny Llama, 4 blocks): servers with ``--swarm-secret`` refuse
clients without it (code ``unauthorized``, not retryable) and serve clients with it, whose outputs match the
model run locally; a client with the secret never routes through a server that lacks it."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.client import ClientConfig, SwarmClient
from swarm.errors import UnauthorizedError
from swarm.messages import InferenceStep, OpenSession, PushRequest, RpcResult, ServerInfoResult
from swarm.routing import Hop
from swarm.service import BlockService
from swarm.span_call import call_forward
from swarm.tensors import encode
from tests.e2e.harness import stream_once
from tests.helpers import make_tiny_model, reference_model

SECRET = "correct horse battery staple"
MODEL_ID = "tiny-private"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("models") / MODEL_ID)


@pytest.fixture(scope="module")
def servers(local_swarm, folder):
    secret = ("--swarm-secret", SECRET)
    return {
        "private_front": local_swarm.start_server(str(folder), "0:2", *secret),
        "public": local_swarm.start_server(str(folder), "0:4"),
        "private_back": local_swarm.start_server(str(folder), "2:4", *secret),
    }


async def make_client(local_swarm, secret: str | None, push: bool = False) -> SwarmClient:
    # No spot-check draws: a checked span's step is not pushed, which would make the push count random.
    config = ClientConfig(
        initial_peers=local_swarm.initial_peers, max_retries=0, swarm_secret=secret, push=push,
        spot_check_probability=0.0,
    )  # fmt: skip
    return await SwarmClient.create(config)


async def test_private_server_refuses_a_client_without_the_secret(local_swarm, servers):
    client = await make_client(local_swarm, None)
    try:
        server = servers["private_front"]
        open_msg = OpenSession(model_id=MODEL_ID, start=0, end=2, session_id="nosecret", max_length=8)
        request = InferenceStep(open=open_msg, position=0)
        raw = runtime_pb2.ExpertRequest(tensors=[encode(torch.randn(1, 1, 64))], metadata=request.encode())
        refused = await stream_once(client, server.peer_id, raw)
        assert refused.error is not None and refused.error.code == "unauthorized" and not refused.error.retryable
        coverage = await client.model_coverage(MODEL_ID, fresh=True)
        front = next(s for s in coverage.servers if s.peer_id == server.peer_id)  # a public client sees it
        with pytest.raises(UnauthorizedError, match="private swarm"):
            await call_forward(client, MODEL_ID, Hop(front, 0, 2), torch.randn(1, 3, 64))
    finally:
        await client.shutdown()


async def test_private_server_refuses_a_push_without_the_secret(local_swarm, servers):
    client = await make_client(local_swarm, None)
    try:
        stub = BlockService.get_stub(client.p2p, client.peer(servers["private_back"].peer_id))
        meta = PushRequest(session_id="s", client_peer_id=client.peer_id, start=2, seq=1, position=0)
        request = runtime_pb2.ExpertRequest(tensors=[encode(torch.randn(1, 1, 64))], metadata=meta.encode())
        result = RpcResult.decode((await stub.rpc_push(request, timeout=10)).metadata)
        assert result.error is not None and result.error.code == "unauthorized"
    finally:
        await client.shutdown()


async def test_client_with_the_secret_routes_only_through_private_servers(local_swarm, servers, folder):
    client = await make_client(local_swarm, SECRET, push=True)
    try:
        coverage = await client.model_coverage(MODEL_ID, fresh=True)
        seen = {s.peer_id for s in coverage.servers}
        assert seen == {servers["private_front"].peer_id, servers["private_back"].peer_id}  # public one ignored
        reference = reference_model(folder)
        input_ids = torch.tensor([[3, 14, 15, 92, 6, 5]])
        with torch.no_grad():
            embeds = reference.model.embed_tokens(input_ids)  # [1, 6, 64]
            expected = reference(input_ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        for _ in range(3):  # whatever the jitter, the route never takes the public server
            async with client.inference_session(MODEL_ID, max_length=16) as session:
                assert [(h.peer_id, h.start, h.end) for h in session.route] == [
                    (servers["private_front"].peer_id, 0, 2),
                    (servers["private_back"].peer_id, 2, 4),
                ]
                out = await session.step(embeds[:, :4])
                out = torch.cat([out, await session.step(embeds[:, 4:])], dim=1)
                assert session.fills == 0, "the second step goes server to server, proof included"
            with torch.no_grad():
                torch.testing.assert_close(reference.model.norm(out), expected, atol=1e-4, rtol=1e-4)
        back = BlockService.get_stub(client.p2p, client.peer(servers["private_back"].peer_id))
        info = ServerInfoResult.decode((await back.rpc_info(runtime_pb2.ExpertRequest(), timeout=10)).metadata)
        assert info.inputs_pushed >= 3
        forward = await client.forward(MODEL_ID, embeds)  # unary calls carry the proof too
        with torch.no_grad():
            torch.testing.assert_close(reference.model.norm(forward), expected, atol=1e-4, rtol=1e-4)
    finally:
        await client.shutdown()
