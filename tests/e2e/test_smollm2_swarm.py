"""The bundled SmolLM2 served by two real server processes equals the same model run locally."""

from __future__ import annotations

import pytest
import torch
from hivemind.proto import runtime_pb2
from transformers import AutoTokenizer

from swarm.client import ClientConfig, SwarmClient
from swarm.errors import BadRequestError, SessionError
from swarm.messages import ForwardRequest, InferenceStep, OpenSession, RpcResult
from swarm.model import AutoDistributedModelForCausalLM
from swarm.service import BlockService
from swarm.tensors import encode
from tests.e2e.harness import stream_once
from tests.helpers import MODEL_CACHE, reference_model

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def swarm(local_swarm):
    local_swarm.start_server(MODEL, "0:15")
    local_swarm.start_server(MODEL, "15:30")
    return local_swarm


@pytest.fixture(scope="module")
def model(swarm):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, initial_peers=swarm.initial_peers, cache_dir=MODEL_CACHE
    )
    yield model
    model.shutdown()


@pytest.fixture(scope="module")
def reference(model):
    return reference_model(model.resolved.folder)


@pytest.fixture(scope="module")
def prompt_ids(model):
    tokenizer = AutoTokenizer.from_pretrained(model.resolved.folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, return_tensors="pt").input_ids


def test_greedy_generation_equals_local(model, reference, prompt_ids):
    ours = model.generate(prompt_ids, max_new_tokens=32)
    with torch.inference_mode():
        theirs = reference.generate(prompt_ids, max_new_tokens=32, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    tokenizer = AutoTokenizer.from_pretrained(model.resolved.folder)
    assert "Paris" in tokenizer.decode(ours[0, prompt_ids.shape[1] :])


def test_final_hidden_states_and_logits_match_local(model, reference, prompt_ids):
    with torch.inference_mode():
        hidden = model._loop.run(model.client.forward(model.model_id, model.head.embed(prompt_ids)))
        expected = reference(prompt_ids, output_hidden_states=True)
        # transformers' last hidden state is taken after the final norm.
        torch.testing.assert_close(model.head.norm(hidden), expected.hidden_states[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(prompt_ids).logits, expected.logits, atol=1e-3, rtol=1e-4)


def test_step_by_step_session_matches_full_forward(model, prompt_ids):
    with torch.inference_mode():
        full = model(prompt_ids).logits
        with model.inference_session(max_length=prompt_ids.shape[1]) as session:
            n = prompt_ids.shape[1]
            prefix = session.step(model.head.embed(prompt_ids[:, : n - 3]))
            tail = [session.step(model.head.embed(prompt_ids[:, i : i + 1])) for i in range(n - 3, n)]
        stepped = model.head.logits(torch.cat([prefix, *tail], dim=1))
    torch.testing.assert_close(stepped, full, atol=1e-3, rtol=1e-4)


# --- a server keeps serving after bad input -------------------------------------------------------------


def _open(session_id: str, **overrides) -> OpenSession:
    fields = dict(model_id=MODEL, start=0, end=15, session_id=session_id, max_length=8)
    return OpenSession(**{**fields, **overrides})


BAD_STREAMS = {
    "wrong hidden size": (lambda: _open("a"), lambda: torch.randn(1, 2, 100), BadRequestError),
    "integer dtype": (lambda: _open("b"), lambda: torch.ones(1, 2, 576, dtype=torch.int64), BadRequestError),
    "NaN": (lambda: _open("c"), lambda: torch.full((1, 2, 576), float("nan")), BadRequestError),
    "infinity": (lambda: _open("d"), lambda: torch.full((1, 2, 576), float("inf")), BadRequestError),
    "over session length": (lambda: _open("e"), lambda: torch.randn(1, 9, 576), BadRequestError),
    "wrong batch size": (lambda: _open("f"), lambda: torch.randn(3, 2, 576), BadRequestError),
    "no open message": (lambda: None, lambda: torch.randn(1, 2, 576), SessionError),
    "unknown model": (lambda: _open("g", model_id="nope"), lambda: torch.randn(1, 2, 576), BadRequestError),
    "blocks not hosted": (lambda: _open("h", end=20), lambda: torch.randn(1, 2, 576), BadRequestError),
    "max_length over limit": (
        lambda: _open("i", max_length=10**7),
        lambda: torch.randn(1, 2, 576),
        BadRequestError,
    ),
}


async def _good_step(client: SwarmClient) -> None:
    async with client.inference_session(MODEL, max_length=4) as session:
        out = await session.step(torch.randn(1, 4, 576))
    assert out.shape == (1, 4, 576) and torch.isfinite(out).all()


async def test_bad_inference_requests_get_structured_errors_and_server_survives(swarm):
    client = await SwarmClient.create(ClientConfig(initial_peers=swarm.initial_peers))
    try:
        first = next(c for c in swarm.children if c.info.get("start") == 0)
        for name, (make_open, make_hidden, error) in BAD_STREAMS.items():
            meta = InferenceStep(open=make_open(), position=0)
            request = runtime_pb2.ExpertRequest(tensors=[encode(make_hidden())], metadata=meta.encode())
            result = await stream_once(client, first.peer_id, request)
            assert result.error is not None, name
            assert result.error.code == error.code, (name, result.error)
        garbage = runtime_pb2.ExpertRequest(metadata=b"\xff\x00garbage")
        result = await stream_once(client, first.peer_id, garbage)
        assert result.error is not None and result.error.code == BadRequestError.code
        broken_tensor = runtime_pb2.Tensor(buffer=b"\x01\x02\x03", size=[1, 2, 576], dtype="float32")
        meta = InferenceStep(open=_open("j"), position=0)
        result = await stream_once(
            client, first.peer_id, runtime_pb2.ExpertRequest(tensors=[broken_tensor], metadata=meta.encode())
        )
        assert result.error is not None and result.error.code == BadRequestError.code
        # stateless forward validates the same way
        stub = BlockService.get_stub(client.p2p, client.peer(first.peer_id))
        bad = runtime_pb2.ExpertRequest(
            tensors=[encode(torch.randn(1, 2, 7))],
            metadata=ForwardRequest(model_id=MODEL, start=0, end=15).encode(),
        )
        answer = RpcResult.decode((await stub.rpc_forward(bad, timeout=30)).metadata)
        assert answer.error is not None and answer.error.code == BadRequestError.code
        # ...and the server is still healthy for everyone else
        await _good_step(client)
        assert all(child.alive() for child in swarm.children)
    finally:
        await client.shutdown()


async def test_step_past_session_position_is_refused(swarm):
    client = await SwarmClient.create(ClientConfig(initial_peers=swarm.initial_peers))
    try:
        first = next(c for c in swarm.children if c.info.get("start") == 0)
        meta = InferenceStep(open=_open("k"), position=3)
        request = runtime_pb2.ExpertRequest(tensors=[encode(torch.randn(1, 1, 576))], metadata=meta.encode())
        result = await stream_once(client, first.peer_id, request)
        assert result.error is not None and "past the session" in result.error.message
        await _good_step(client)
    finally:
        await client.shutdown()


def test_float16_activations_keep_greedy_tokens_and_halve_the_bytes(swarm, prompt_ids):
    compression = "float16"
    plain_config = ClientConfig(initial_peers=swarm.initial_peers)
    packed_config = ClientConfig(initial_peers=swarm.initial_peers, compression=compression)
    plain = AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, [], cache_dir=MODEL_CACHE, client_config=plain_config
    )
    packed = AutoDistributedModelForCausalLM.from_pretrained(
        MODEL, [], cache_dir=MODEL_CACHE, client_config=packed_config
    )
    try:
        expected = plain.generate(prompt_ids, max_new_tokens=16)
        ours = packed.generate(prompt_ids, max_new_tokens=16)
        assert ours.tolist() == expected.tolist()
        ratio = packed.client.wire_bytes_sent / plain.client.wire_bytes_sent
        received = packed.client.wire_bytes_received / plain.client.wire_bytes_received
        assert ratio < 0.55 and received < 0.55, (ratio, received)
    finally:
        plain.shutdown()
        packed.shutdown()
