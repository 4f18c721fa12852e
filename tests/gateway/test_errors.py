"""Every error status and its OpenAI body; errors after a stream started; client disconnects."""

from __future__ import annotations

import asyncio
import json

import pytest

from swarm.errors import MissingBlocksError, PeerUnreachableError, ServerBusyError
from tests.gateway.fakes import MODEL_ID, parse_sse

CHAT = "/v1/chat/completions"


def body(**fields):
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def assert_error(r, status: int, code: str | None = None, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert r.headers["x-request-id"]
    return err


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
    ],
)
async def test_validation_is_400_naming_the_field(client, fields, param):
    err = assert_error(await client.post(CHAT, json=body(**fields)), 400, param=param)
    assert err["type"] == "invalid_request_error"


async def test_semantic_400s(client):
    assert_error(await client.post(CHAT, json=body(n=99)), 400, param="n")
    assert_error(await client.post(CHAT, json=body(max_tokens=10_000)), 400, param="max_tokens")
    assert_error(await client.post(CHAT, json=body(logit_bias={"999999": 1})), 400, param="logit_bias")
    assert_error(await client.post(CHAT, json=body(top_logprobs=2)), 400, param="top_logprobs")
    parts = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(await client.post(CHAT, json=body(messages=parts)), 400, param="messages[0].content[0]")
    r = await client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)


async def test_context_length_exceeded(client):
    long = "word " * 400  # the tiny model's context is 256 tokens
    r = await client.post(CHAT, json=body(messages=[{"role": "user", "content": long}]))
    assert_error(r, 400, code="context_length_exceeded", param="messages")
    medium = [{"role": "user", "content": "word " * 40}]
    r = await client.post(CHAT, json=body(messages=medium, max_tokens=200))  # ~70 prompt tokens + 200 > 256
    assert_error(r, 400, code="context_length_exceeded")


async def test_unknown_model_is_404(client):
    err = assert_error(await client.post(CHAT, json=body(model="nope")), 404, code="model_not_found")
    assert err["param"] == "model"
    assert_error(await client.get("/v1/models/nope"), 404, code="model_not_found")


async def test_api_keys(make_client, settings):
    settings = settings.model_copy(update={"api_keys": ["k1", "k2"]})
    async with make_client(settings) as client:
        assert_error(await client.post(CHAT, json=body()), 401, code="invalid_api_key")
        bad = {"Authorization": "Bearer nope"}
        assert_error(await client.post(CHAT, json=body(), headers=bad), 401, code="invalid_api_key")
        assert_error(await client.get("/v1/models", headers=bad), 401)
        ok = await client.post(CHAT, json=body(), headers={"Authorization": "Bearer k2"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200  # open without a key


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ServerBusyError("cache full"), 429, "server_busy"),
        (MissingBlocksError(MODEL_ID, [2, 3]), 503, "missing_blocks"),
        (PeerUnreachableError("peer gone"), 502, "peer_unreachable"),
        (TimeoutError(), 504, "timeout"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_swarm_errors_before_the_first_token(client, fake_swarm, error, status, code, stream):
    fake_swarm.open_error = error
    err = assert_error(await client.post(CHAT, json=body(stream=stream)), status, code=code)
    assert "Traceback" not in err["message"]
    r = await client.post(CHAT, json=body(stream=stream))
    if status in (429, 503):
        assert r.headers["retry-after"].isdigit()


async def test_step_timeout_is_504(client, fake_swarm):
    fake_swarm.fail_at_step, fake_swarm.step_error = 2, TimeoutError()
    assert_error(await client.post(CHAT, json=body()), 504, code="timeout")
    assert fake_swarm.sessions[-1].closed


async def test_slow_step_hits_the_request_timeout(make_client, settings, fake_swarm):
    fake_swarm.step_delay_s = 1.0
    async with make_client(settings.model_copy(update={"request_timeout_s": 0.2})) as client:
        assert_error(await client.post(CHAT, json=body()), 504, code="timeout")


async def test_unexpected_error_is_a_generic_500(client, fake_swarm):
    fake_swarm.open_error = ZeroDivisionError("secret detail")
    err = assert_error(await client.post(CHAT, json=body()), 500, code="internal_error")
    assert "secret" not in err["message"]


async def test_error_mid_stream_is_a_final_event(client, fake_swarm):
    fake_swarm.fail_at_step, fake_swarm.step_error = 3, PeerUnreachableError("server died")
    r = await client.post(CHAT, json=body(stream=True, max_tokens=10, temperature=0))
    assert r.status_code == 200
    events = parse_sse(r.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "peer_unreachable"
    assert any(e.get("choices") for e in events[:-2])
    assert fake_swarm.sessions[-1].closed


async def test_client_disconnect_closes_the_session(client, fake_swarm):
    """Drive the ASGI app directly (httpx's ASGITransport buffers), disconnecting after the first chunks."""
    fake_swarm.step_delay_s = 0.02
    app = client.app
    request = json.dumps(body(stream=True, max_tokens=150, temperature=0)).encode()
    chunks: list[bytes] = []
    disconnect = asyncio.Event()
    sent_request = False

    async def receive():
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": request, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if len(chunks) >= 3:
                disconnect.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": CHAT, "raw_path": CHAT.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    session = fake_swarm.sessions[-1]
    assert session.closed
    assert session.steps < 50  # stopped early, not after all 150 tokens
