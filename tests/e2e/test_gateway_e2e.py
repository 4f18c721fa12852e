"""The real gateway process over a real loopback swarm (SmolLM2 split 0:15 / 15:30), driven by the official
``openai`` SDK and LangChain: answers equal transformers run locally, every OpenAI knob works end to end,
errors keep OpenAI's shape, a client disconnect frees the servers' sessions, missing blocks read as 503.

One gateway serves the whole module (started with ``--api-keys``, so every client sends the key). The last
test stops a server: keep it last.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI
from transformers import AutoTokenizer

from swarm.weights import resolve_model
from tests.e2e.gateway_process import GatewayProcess, running_gateway
from tests.e2e.harness import Child, LocalSwarm
from tests.helpers import MODEL_CACHE, reference_model

MODEL = "smollm2-135m-instruct"
API_KEY = "secret"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
GREEDY_TOKENS = 24
SESSION_CLOSE_S = 5.0
"""How soon after a client hangs up every server must have closed the request's session."""


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(local_swarm: LocalSwarm, tmp_path_factory, request) -> Iterator[GatewayProcess]:
    # Servers and gateway start side by side (the gateway needs only the bootstrap).
    servers = [local_swarm.start_server(MODEL, span, wait=False) for span in ("0:15", "15:30")]
    workdir = tmp_path_factory.mktemp("gateway")
    failures = lambda: request.session.testsfailed  # noqa: E731
    with running_gateway(
        local_swarm, workdir, MODEL_CACHE, [MODEL], "--api-keys", API_KEY, servers=servers, failures=failures
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def sdk(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{gateway.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def folder():
    return resolve_model(MODEL, MODEL_CACHE).folder


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def no_eos(tokenizer) -> dict[str, int]:
    """logit_bias that keeps a greedy answer from ending early."""
    return {str(tokenizer.eos_token_id): -100}


@pytest.fixture(scope="module")
def greedy_france(sdk):
    return sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=GREEDY_TOKENS)


def _stream_text(stream) -> tuple[str, str | None, list]:
    """(content, finish_reason, chunks) of a one-choice chat stream."""
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) <= 1, finish
    return content, (finish[0] if finish else None), chunks


# --- answers --------------------------------------------------------------------------------------------


def test_capital_of_france_is_paris(greedy_france):
    choice = greedy_france.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert greedy_france.model == MODEL and greedy_france.object == "chat.completion"


def test_greedy_answer_equals_transformers_locally(greedy_france, folder, tokenizer):
    text = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    reference = reference_model(folder)
    with torch.inference_mode():
        out = reference.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=GREEDY_TOKENS, do_sample=False
        )
    new = out[0, prompt_ids.shape[1] :].tolist()
    configured = reference.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    cut = next((i for i, t in enumerate(new) if t in eos), None)
    expected_finish = "length" if cut is None else "stop"
    expected = tokenizer.decode(new[:cut], skip_special_tokens=True)
    choice = greedy_france.choices[0]
    assert choice.message.content == expected
    assert choice.finish_reason == expected_finish
    assert greedy_france.usage.prompt_tokens == prompt_ids.shape[1]
    assert greedy_france.usage.completion_tokens == (len(new) if cut is None else cut + 1)


def test_stream_equals_non_streamed_and_reports_usage(sdk, greedy_france):
    stream = sdk.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=GREEDY_TOKENS, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    content, finish, chunks = _stream_text(stream)
    assert content == greedy_france.choices[0].message.content
    assert finish == greedy_france.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert last.usage.prompt_tokens == greedy_france.usage.prompt_tokens
    assert last.usage.completion_tokens == greedy_france.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_n_choices_and_stop_strings(sdk, greedy_france):
    sampled = sdk.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0.8, seed=5, n=2, stop=[" "], max_tokens=12
    )
    assert sorted(c.index for c in sampled.choices) == [0, 1]
    for choice in sampled.choices:
        assert " " not in choice.message.content and choice.finish_reason == "stop"
    # Greedy with a stop string from the known answer: the text up to it, and nothing after.
    cut = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, stop="Paris", max_tokens=12)
    expected = greedy_france.choices[0].message.content.split("Paris")[0]
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(sdk):
    def sample(seed: int) -> str:
        answer = sdk.chat.completions.create(model=MODEL, messages=STORY, temperature=1.0, seed=seed, max_tokens=10)
        return answer.choices[0].message.content

    first = sample(11)
    assert sample(11) == first
    others = {sample(12), sample(13)}
    assert others != {first}, "three seeds drew the same 10 tokens"


def test_logprobs_tokens_spell_the_content(sdk):
    cut = sdk.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    full = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, logprobs=True, top_logprobs=3)
    assert cut.choices[0].finish_reason == "length" and full.choices[0].finish_reason == "stop"
    assert len(cut.choices[0].logprobs.content) == cut.usage.completion_tokens
    # An answer that ends on the end-of-sequence token lists no entry for it: the entries spell the content.
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens - 1
    for answer in (cut, full):
        choice = answer.choices[0]
        entries = choice.logprobs.content
        assert "".join(e.token for e in entries) == choice.message.content
        for entry in entries:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
            assert entry.top_logprobs[0].token == entry.token  # greedy picks the likeliest
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
            assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_max_tokens_finishes_with_length(sdk):
    answer = sdk.chat.completions.create(model=MODEL, messages=STORY, temperature=0, max_tokens=5)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 5


def test_langchain_invoke_and_stream(gateway):
    chat = ChatOpenAI(
        base_url=f"{gateway.base_url}/v1", api_key=API_KEY, model=MODEL, temperature=0, max_retries=0,
        max_tokens=16, timeout=120,
    )  # fmt: skip
    answer = chat.invoke("What is the capital of France?")
    assert "Paris" in answer.content
    streamed = "".join(chunk.content for chunk in chat.stream("What is the capital of France?"))
    assert streamed == answer.content


async def test_eight_concurrent_streams_equal_sequential_answers(gateway, sdk):
    prompts = [
        "What is the capital of France?",
        "Name a primary color.",
        "What is 2 + 2?",
        "Say hello in Spanish.",
    ]
    kwargs = dict(model=MODEL, temperature=0, max_tokens=8)
    sequential = {
        p: sdk.chat.completions.create(messages=[{"role": "user", "content": p}], **kwargs).choices[0].message.content
        for p in prompts
    }
    client = AsyncOpenAI(base_url=f"{gateway.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await client.chat.completions.create(
            messages=[{"role": "user", "content": prompt}], stream=True, **kwargs
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        jobs = prompts * 2
        answers = await asyncio.wait_for(asyncio.gather(*(one(p) for p in jobs)), 120)
    finally:
        await client.close()
    assert answers == [sequential[p] for p in jobs]


# --- errors through the real server ---------------------------------------------------------------------


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_unknown_model_is_404(sdk):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="no-such-model", messages=FRANCE, max_tokens=2)
    assert info.value.status_code == 404
    error = _error(info.value)
    assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert error["param"] == "model"


def test_invalid_temperature_and_missing_messages_are_400(sdk, gateway):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=5, max_tokens=2)
    error = _error(info.value)
    assert error["type"] == "invalid_request_error" and error["param"] == "temperature"
    # The SDK will not send a request without messages; plain HTTP does.
    response = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json={"model": MODEL, "max_tokens": 2},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_prompt_over_the_context_is_400(sdk):
    long_prompt = [{"role": "user", "content": "hello " * 6000}]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=4000)
    error = _error(info.value)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "8192" in error["message"]


def test_missing_or_wrong_api_key_is_401(gateway):
    with pytest.raises(openai.AuthenticationError) as info:
        OpenAI(base_url=f"{gateway.base_url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=FRANCE, max_tokens=2
        )
    assert info.value.status_code == 401 and _error(info.value)["code"] == "invalid_api_key"
    response = httpx.post(
        f"{gateway.base_url}/v1/chat/completions", json={"model": MODEL, "messages": FRANCE}, timeout=30
    )
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{gateway.base_url}/health", timeout=30).status_code == 200  # health stays open


# --- sessions and failures ------------------------------------------------------------------------------


def _block_servers(swarm: LocalSwarm) -> list[Child]:
    return [c for c in swarm.children if "start" in c.info]


def test_client_disconnect_closes_server_sessions(sdk, local_swarm, no_eos):
    servers = _block_servers(local_swarm)
    offsets = {s.name: len(s.log()) for s in servers}
    max_tokens = 200
    stream = sdk.chat.completions.create(
        model=MODEL, messages=STORY, temperature=0, max_tokens=max_tokens, logit_bias=no_eos, stream=True
    )
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen >= 3:
            break
    stream.close()  # hang up mid-answer
    hung_up = time.monotonic()
    for server in servers:
        closed = None
        while closed is None:
            new = server.log()[offsets[server.name] :]
            opened = re.findall(r"session (\w+) opened", new)
            assert len(opened) <= 1, new
            if opened:
                closed = re.search(rf"session {opened[0]} closed after (\d+) tokens", new)
            if closed is None:
                assert time.monotonic() - hung_up < SESSION_CLOSE_S, f"{server.name} kept the session:\n{new}"
                time.sleep(0.1)
        prompt_and_answer = int(closed.group(1))
        assert prompt_and_answer < 100, f"{server.name} ran the session to its end ({prompt_and_answer} tokens)"


def test_missing_blocks_is_503_with_retry_after(sdk, gateway, local_swarm):
    """Runs last: stops the 15:30 server, then the gateway must say 503 (not hang, not 500)."""
    second_half = next(s for s in _block_servers(local_swarm) if s.info["start"] == 15)
    second_half.signal(signal.SIGTERM)  # SIGTERM: the server announces itself offline on the way out
    health = gateway.wait_health(lambda h: not h["models"][MODEL]["complete"], timeout_s=30)
    assert health["models"][MODEL]["missing"] == list(range(15, 30))
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as info:
            sdk.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, stream=stream)
        assert info.value.status_code == 503, stream
        assert int(info.value.response.headers["retry-after"]) > 0
        error = _error(info.value)
        assert error["type"] == "service_unavailable" and error["code"] == "missing_blocks"
    assert gateway.alive()


def test_a_server_joining_brings_the_model_back(sdk, gateway, local_swarm, greedy_france):
    """Runs after the 503 test: a new server for the missing blocks makes the same gateway serve again."""
    local_swarm.start_server(MODEL, "15:30")
    gateway.wait_health(lambda h: h["models"][MODEL]["complete"], timeout_s=30)
    again = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=GREEDY_TOKENS)
    assert again.choices[0].message.content == greedy_france.choices[0].message.content
    assert gateway.alive()
