"""Random and malformed messages thrown at a real server's RPCs: every answer is a structured error or a valid
result, the server never dies, and no session or cache memory is left behind."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.client import ClientConfig, SwarmClient
from swarm.messages import ForwardRequest, InferenceStep, OpenSession, RpcResult, ServerInfoResult
from swarm.service import BlockService
from swarm.tensors import encode
from tests.e2e.harness import stream_once
from tests.helpers import make_tiny_model

MODEL_ID = "tiny-fuzz"
HIDDEN = 64
CASES = 60
KNOWN_CODES = {"bad_request", "session_error", "server_busy", "protocol_mismatch", "unauthorized"}


@pytest.fixture(scope="module")
def server(local_swarm, tmp_path_factory):
    folder = make_tiny_model("llama", tmp_path_factory.mktemp("models") / MODEL_ID)
    return local_swarm.start_server(str(folder), "0:4", "--cache-budget-mb", "1")


def random_tensor(rng: random.Random) -> runtime_pb2.Tensor:
    choice = rng.randrange(6)
    if choice == 0:  # garbage bytes claiming a shape
        return runtime_pb2.Tensor(buffer=rng.randbytes(rng.randrange(0, 64)), size=[1, 2, HIDDEN], dtype="float32")
    if choice == 1:  # a dtype the swarm does not accept
        return encode(torch.randint(0, 9, (1, rng.randrange(1, 4), HIDDEN)))
    shape = [rng.randrange(0, 3), rng.randrange(0, 5), rng.choice([HIDDEN, HIDDEN + 1, 7])]
    shape = shape[: rng.randrange(1, 4)]
    x = torch.randn(*shape)
    if choice == 2 and x.numel():
        x.view(-1)[0] = rng.choice([float("nan"), float("inf"), -float("inf")])
    return encode(x.to(rng.choice([torch.float32, torch.float16, torch.bfloat16])))


def random_metadata(rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 40))
    if choice == 1:
        return json.dumps({"position": rng.randrange(-3, 9), "open": rng.choice([None, 3, "x", {}])}).encode()
    open_msg = OpenSession(
        model_id=rng.choice([MODEL_ID, "other"]), start=rng.randrange(0, 5), end=rng.randrange(1, 7),
        session_id=f"f{rng.randrange(10**6)}", max_length=rng.choice([1, 8, 64, 10**6]),
        batch_size=rng.randrange(1, 4), protocol_version=rng.choice([1, 1, 1, 2]),
    )  # fmt: skip
    return InferenceStep(open=rng.choice([open_msg, None]), position=rng.randrange(0, 4)).encode()


async def test_random_messages_never_crash_or_leak(local_swarm, server):
    rng = random.Random(1234)
    client = await SwarmClient.create(ClientConfig(initial_peers=local_swarm.initial_peers, max_retries=0))
    stub = BlockService.get_stub(client.p2p, client.peer(server.peer_id))
    try:
        info = ServerInfoResult.decode((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=10)).metadata)
        full_cache = info.cache_tokens_left
        for _ in range(CASES):
            tensors = [random_tensor(rng) for _ in range(rng.randrange(0, 3))]
            request = runtime_pb2.ExpertRequest(tensors=tensors, metadata=random_metadata(rng))
            result = await stream_once(client, server.peer_id, request)
            assert result.error is None or result.error.code in KNOWN_CODES, result.error
            span = ForwardRequest(model_id=MODEL_ID, start=0, end=rng.randrange(1, 6)).encode()
            meta = rng.choice([span, rng.randbytes(rng.randrange(0, 20))])
            for method in (stub.rpc_forward, stub.rpc_backward):
                answer = RpcResult.decode(
                    (await method(runtime_pb2.ExpertRequest(tensors=tensors, metadata=meta), timeout=30)).metadata
                )
                assert answer.error is None or answer.error.code in KNOWN_CODES, answer.error
        assert server.alive()
        await asyncio.sleep(0.5)  # streams that ended with an error are closed on the server's side
        info = ServerInfoResult.decode((await stub.rpc_info(runtime_pb2.ExpertRequest(), timeout=10)).metadata)
        assert info.active_sessions == 0 and info.cache_tokens_left == full_cache
        async with client.inference_session(MODEL_ID, max_length=8) as session:  # still serves correctly
            out = await session.step(torch.randn(1, 3, HIDDEN))
        assert out.shape == (1, 3, HIDDEN) and torch.isfinite(out).all()
    finally:
        await client.shutdown()
