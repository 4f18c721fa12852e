"""The official openai SDK against the in-process app: chat, streaming, legacy completions, models, errors."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway.fakes import MODEL_ID


@pytest.fixture
async def sdk(make_client, settings):
    settings = settings.model_copy(update={"api_keys": ["sk-test"]})
    async with make_client(settings) as client:
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app))
        yield openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="sk-test", max_retries=0, http_client=http)
        await http.aclose()


async def test_sdk_chat_stream_and_plain(sdk):
    messages = [{"role": "user", "content": "Hello"}]
    plain = await sdk.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].finish_reason == "length" and plain.usage.completion_tokens == 8
    stream = await sdk.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == plain.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 8


async def test_sdk_completions_and_models(sdk):
    done = await sdk.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.object == "text_completion"
    echoed = await sdk.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == "Once upon a time" + done.choices[0].text
    text = ""
    async for chunk in await sdk.completions.create(
        model=MODEL_ID, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True
    ):
        text += chunk.choices[0].text if chunk.choices else ""
    assert text == done.choices[0].text
    models = await sdk.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert (await sdk.models.retrieve(MODEL_ID)).id == MODEL_ID


async def test_sdk_errors(sdk):
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "x"}], n=100)
