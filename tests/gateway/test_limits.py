"""Gateway limits: per-key requests and tokens per minute, body size, messages, prompt tokens, max_tokens and n,
keys from a file, CORS. Each limit answers with its status and an OpenAI error body, and the gateway goes on
answering correctly afterwards."""

from __future__ import annotations

import pytest

from tests.gateway.fakes import MODEL_ID

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Say something."}]


def body(**fields):
    return {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, **fields}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response, status: int, *, code: str, type_: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"]
    if type_ is not None:
        assert err["type"] == type_
    if param is not None:
        assert err["param"] == param
    return err


async def assert_serves(client, headers: dict[str, str] | None = None) -> None:
    r = await client.post(CHAT, json=body(), headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


async def test_requests_per_minute_per_key(make_client, settings, clock, fake_swarm):
    settings = settings.model_copy(update={"api_keys": ["ka", "kb"], "rate_limit_rpm": 2})
    async with make_client(settings) as client:
        client.app.state.rate_limiter.clock = clock
        await assert_serves(client, auth("ka"))
        await assert_serves(client, auth("ka"))
        opened = len(fake_swarm.sessions)
        r = await client.post(CHAT, json=body(), headers=auth("ka"))
        err = assert_error(r, 429, code="rate_limit_exceeded", type_="requests")
        assert "requests per min" in err["message"]
        assert int(r.headers["retry-after"]) == 30  # one request refills in 60 s / 2
        assert len(fake_swarm.sessions) == opened  # refused before any swarm work
        await assert_serves(client, auth("kb"))  # another key has its own bucket
        clock.now += 30
        await assert_serves(client, auth("ka"))


async def test_rate_limits_apply_per_client_without_keys(make_client, settings, clock):
    settings = settings.model_copy(update={"rate_limit_rpm": 1})
    async with make_client(settings) as client:
        client.app.state.rate_limiter.clock = clock
        await assert_serves(client)
        assert_error(await client.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": "hi"}), 429,
                     code="rate_limit_exceeded")  # fmt: skip
        clock.now += 60
        await assert_serves(client)


async def test_tokens_per_minute_count_prompt_and_max_tokens(make_client, settings, clock, fake_swarm):
    settings = settings.model_copy(update={"api_keys": ["ka"], "rate_limit_tpm": 100})
    async with make_client(settings) as client:
        client.app.state.rate_limiter.clock = clock
        headers = auth("ka")
        r = await client.post(CHAT, json=body(max_tokens=150), headers=headers)
        err = assert_error(r, 429, code="rate_limit_exceeded", type_="tokens")
        assert "Request too large" in err["message"] and "retry-after" not in r.headers  # waiting cannot help
        r = await client.post(CHAT, json=body(max_tokens=20, n=2), headers=headers)  # prompt + 2 x 20 of 100
        assert r.status_code == 200
        prompt = r.json()["usage"]["prompt_tokens"]
        assert 100 - (prompt + 40) < prompt + 40  # so the same request again does not fit
        opened = len(fake_swarm.sessions)
        r = await client.post(CHAT, json=body(max_tokens=20, n=2), headers=headers)
        assert_error(r, 429, code="rate_limit_exceeded", type_="tokens")
        assert int(r.headers["retry-after"]) >= 1
        assert len(fake_swarm.sessions) == opened
        stream = await client.post(
            COMPLETIONS, json={"model": MODEL_ID, "prompt": "x " * 80, "max_tokens": 5, "stream": True},
            headers=headers,
        )  # fmt: skip
        assert_error(stream, 429, code="rate_limit_exceeded", type_="tokens")  # refused before the stream starts
        clock.now += 60
        await assert_serves(client, headers)


async def test_huge_body_is_refused_before_parsing(make_client, settings):
    settings = settings.model_copy(update={"max_body_bytes": 2000})
    async with make_client(settings) as client:
        huge = body(messages=[{"role": "user", "content": "x" * 5000}])
        err = assert_error(await client.post(CHAT, json=huge), 413, code="request_too_large")
        assert "2000 bytes" in err["message"]

        async def chunks():  # no Content-Length: the limit counts the bytes as they arrive
            yield b'{"model": "' + b"y" * 1500
            yield b"z" * 1500 + b'"}'

        r = await client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413, code="request_too_large")
        await assert_serves(client)


async def test_too_many_messages(make_client, settings):
    settings = settings.model_copy(update={"max_messages": 2})
    async with make_client(settings) as client:
        three = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, *MESSAGES]
        r = await client.post(CHAT, json=body(messages=three))
        assert_error(r, 400, code="too_many_messages", type_="invalid_request_error", param="messages")
        await assert_serves(client)


async def test_prompt_token_limit(make_client, settings):
    settings = settings.model_copy(update={"max_prompt_tokens": 60})  # the chat template alone is ~30
    async with make_client(settings) as client:
        long = [{"role": "user", "content": "word " * 80}]
        r = await client.post(CHAT, json=body(messages=long))
        assert_error(r, 400, code="prompt_too_long", type_="invalid_request_error", param="messages")
        r = await client.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": "word " * 80, "max_tokens": 2})
        assert_error(r, 400, code="prompt_too_long", param="prompt")
        r = await client.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": "word " * 5, "max_tokens": 2})
        assert r.status_code == 200
        await assert_serves(client)


async def test_max_tokens_and_n_limits(client, settings):
    r = await client.post(CHAT, json=body(max_tokens=settings.max_tokens_limit + 1))
    assert_error(r, 400, code="invalid_value", type_="invalid_request_error", param="max_tokens")
    r = await client.post(CHAT, json=body(n=settings.max_n + 1))
    assert_error(r, 400, code="invalid_value", param="n")
    await assert_serves(client)


async def test_api_keys_from_a_file(make_client, settings, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nsk-file-1\n\n  sk-file-2  \n")
    settings = settings.model_copy(update={"api_keys": ["sk-list"], "api_keys_file": keys})
    async with make_client(settings) as client:
        for key in ("sk-list", "sk-file-1", "sk-file-2"):
            await assert_serves(client, auth(key))
        for bad in ("# team keys", "sk-file", "nope"):
            assert_error(await client.post(CHAT, json=body(), headers=auth(bad)), 401, code="invalid_api_key")
        assert_error(await client.post(CHAT, json=body()), 401, code="invalid_api_key")


async def test_cors_is_configurable(make_client, settings):
    origin = "https://app.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    async with make_client(settings.model_copy(update={"cors_origins": [origin]})) as client:
        r = await client.options(CHAT, headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        r = await client.options(CHAT, headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        await assert_serves(client)
    async with make_client(settings) as client:  # no origins: no CORS headers at all
        r = await client.options(CHAT, headers=preflight)
        assert "access-control-allow-origin" not in r.headers
