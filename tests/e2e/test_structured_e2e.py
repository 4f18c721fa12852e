"""Structured output and tools through the real gateway process and a real loopback swarm (SmolLM2 split
0:15 / 15:30), driven by the official ``openai`` SDK and LangChain: JSON mode parses, json_schema output
validates, a required tool call validates, and a ``bind_tools`` round trip ends in an answer."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import OpenAI

from tests.e2e.gateway_process import GatewayProcess, running_gateway
from tests.e2e.harness import LocalSwarm
from tests.helpers import MODEL_CACHE

MODEL = "smollm2-135m-instruct"

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["engineer", "doctor", "teacher", "artist"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30, "description": "City name"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}


@pytest.fixture(scope="module")
def gateway(local_swarm: LocalSwarm, tmp_path_factory, request) -> Iterator[GatewayProcess]:
    servers = [local_swarm.start_server(MODEL, span, wait=False) for span in ("0:15", "15:30")]
    workdir = tmp_path_factory.mktemp("gateway")
    failures = lambda: request.session.testsfailed  # noqa: E731
    with running_gateway(local_swarm, workdir, MODEL_CACHE, [MODEL], servers=servers, failures=failures) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def sdk(gateway: GatewayProcess) -> OpenAI:
    return OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0, timeout=120)


def test_json_mode_parses(sdk: OpenAI):
    r = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=48,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.parametrize(
    "prompt",
    ["Describe a software engineer from Paris.", "Invent a person who teaches in Tokyo.", "Who is a doctor?"],
)
def test_json_schema_validates(sdk: OpenAI, prompt: str):
    r = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"{prompt} Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        temperature=0.7,
        seed=1,
        max_tokens=120,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_schema_streamed(sdk: OpenAI):
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe an artist from Rome in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        temperature=0,
        max_tokens=120,
        stream=True,
    )
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(parts)), PERSON)


def test_required_tool_call_validates(sdk: OpenAI):
    r = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather like in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_bad_schema_is_400(sdk: OpenAI):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
            max_tokens=4,
        )
    assert info.value.body["param"] == "response_format.json_schema.schema"


def test_langchain_bind_tools_round_trip(gateway: GatewayProcess):
    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return json.dumps({"city": city, "temperature_c": 21, "sky": "sunny"})

    llm = ChatOpenAI(
        model=MODEL, base_url=f"{gateway.base_url}/v1", api_key="x", temperature=0, max_tokens=60, max_retries=0
    )
    history = [HumanMessage("What is the weather in Paris?")]
    asked = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(history)
    assert isinstance(asked, AIMessage) and asked.tool_calls, asked
    call = asked.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    history += [asked, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    # The answering turn offers no tools (a 135M model offered them tends to call again); the history still
    # carries the call and its result, which the gateway must render for the model.
    answer = llm.invoke(history)
    assert isinstance(answer, AIMessage) and not answer.tool_calls
    assert answer.content.strip(), answer
