"""Structured output and tools through the ASGI app with a fake swarm and a random head: whatever the model
wants, the grammar makes the output valid; tool calls come back in OpenAI's shapes; bad schemas are 400s."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from gateway.generation.constraint import apply_token_bitmask
from gateway.generation.model import LoadedModel
from gateway.generation.tokenization import render_chat
from gateway.generation.tool_format import ToolCallScanner, inline_tools, parse_tool_calls
from gateway.schemas.chat import ChatMessage
from gateway.services.chat import template_messages
from tests.gateway.fakes import EOS, MODEL_ID, parse_sse, tiny_loaded_model

MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "member": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "member", "address"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]},
    },
}


@pytest.fixture
def loaded_model(tokenizer) -> LoadedModel:
    """The usual tiny model with room for a tools system prompt (about 220 tokens) plus a few calls."""
    return tiny_loaded_model(tokenizer, context_length=1024)


async def chat(client, **fields):
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 200, **fields}
    return await client.post("/v1/chat/completions", json=body)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def stream_events(response) -> list[dict]:
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    return [e for e in events[:-1] if isinstance(e, dict)]


def stream_content(events: list[dict], index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []) if c["index"] == index)


# --- response_format --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_json_schema_from_a_random_model_validates(client, seed):
    r = await chat(client, response_format=schema_format(PERSON), temperature=1.0, seed=seed)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


async def test_json_schema_n_choices_each_validate(client):
    r = await chat(client, response_format=schema_format(PERSON), n=3, temperature=1.0, seed=5)
    for choice in r.json()["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


async def test_json_schema_streamed_equals_non_streamed(client):
    fields = {"response_format": schema_format(PERSON), "temperature": 0}
    plain = (await chat(client, **fields)).json()["choices"][0]["message"]["content"]
    events = stream_events(await chat(client, stream=True, **fields))
    assert stream_content(events) == plain
    jsonschema.validate(json.loads(plain), PERSON)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["stop"]


async def test_eos_only_when_the_grammar_accepts(client):
    """A model that wants to stop at once (EOS heavily favoured) still completes the JSON, then stops."""
    r = await chat(client, response_format=schema_format(PERSON), temperature=0, logit_bias={str(EOS): 100})
    choice = r.json()["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert choice["finish_reason"] == "stop"


async def test_json_object_mode(client, tokenizer):
    """Any JSON object is allowed; the random model is nudged to close it early so the test stays short."""
    close = tokenizer("}", add_special_tokens=False)["input_ids"][0]
    for stream in (False, True):
        r = await chat(
            client, response_format={"type": "json_object"}, temperature=0, logit_bias={str(close): 30}, stream=stream
        )
        text = stream_content(stream_events(r)) if stream else r.json()["choices"][0]["message"]["content"]
        assert isinstance(json.loads(text), dict)


async def test_text_format_is_unconstrained(client):
    plain = (await chat(client, max_tokens=8, temperature=0)).json()
    text = (await chat(client, max_tokens=8, temperature=0, response_format={"type": "text"})).json()
    assert plain["choices"][0]["message"] == text["choices"][0]["message"]


def test_bitmask_application_matches_a_plain_loop():
    logits = torch.randn(2, 70)  # [B, V]
    allowed = torch.rand(2, 70) < 0.3  # [B, V]
    words = torch.zeros(2, 3, dtype=torch.int64)
    for b, t in allowed.nonzero().tolist():
        words[b, t // 32] |= 1 << (t % 32)
    bitmask = ((words + 2**31) % 2**32 - 2**31).to(torch.int32)  # [B, W], as two's complement words
    out = apply_token_bitmask(logits, bitmask)
    assert torch.equal(out == float("-inf"), ~allowed)
    assert torch.equal(out[allowed], logits[allowed])


# --- tools --------------------------------------------------------------------------------------------------


def arguments_valid(call: dict, tools: list[dict]) -> dict:
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call["function"]["name"])
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, schema)
    return arguments


@pytest.mark.parametrize("seed", [1, 2])
async def test_required_tool_call_validates(client, seed):
    tools = [WEATHER, TIME]
    r = await chat(client, tools=tools, tool_choice="required", temperature=1.0, seed=seed)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert calls and all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == len(calls)
    for call in calls:
        arguments_valid(call, tools)


async def test_named_tool_choice_calls_that_function_once(client):
    tools = [WEATHER, TIME]
    choice_ = {"type": "function", "function": {"name": "get_time"}}
    r = await chat(client, tools=tools, tool_choice=choice_, temperature=1.0, seed=3)
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_time"]
    assert arguments_valid(calls[0], tools)["zone"] in ("utc", "cet")


async def test_streamed_tool_call_deltas(client):
    tools = [WEATHER]
    r = await chat(client, tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=0, stream=True)
    events = stream_events(r)
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    tool_deltas = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert stream_content(events) == ""
    head, body = tool_deltas[0][0], tool_deltas[1][0]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert set(body) == {"index", "function"} and set(body["function"]) == {"arguments"}
    call = {"function": {"name": "get_weather", "arguments": body["function"]["arguments"]}}
    arguments_valid(call, tools)
    finals = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert [c["finish_reason"] for c in finals] == ["tool_calls"] and finals[0]["delta"] == {}


async def test_tool_choice_none_leaves_the_prompt_and_output_alone(client):
    plain = (await chat(client, max_tokens=6, temperature=0)).json()
    none = (await chat(client, max_tokens=6, temperature=0, tools=[WEATHER], tool_choice="none")).json()
    assert none["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    assert none["choices"][0]["message"] == plain["choices"][0]["message"]


def test_parse_tool_calls_forms():
    known = {"get_weather", "get_time"}
    content, calls = parse_tool_calls(
        '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>', known
    )
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    text = (
        'Let me check. <tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"utc\\"}"}</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    )
    content, calls = parse_tool_calls(text, known)
    assert content == "Let me check." and [c.name for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[0].arguments) == {"zone": "utc"}
    for bad in ['<tool_call>[{"name": "rm_rf", "arguments": {}}]</tool_call>', "<tool_call>[{broken", "no call here"]:
        assert parse_tool_calls(bad, known) == (bad, [])


def test_scanner_holds_back_only_what_may_be_a_call():
    scanner = ToolCallScanner()
    out = [
        scanner.push(t) for t in ["Sure", ". <tool", '_call>[{"name": ', '"get_time", "arguments": {}}]</tool_call>']
    ]
    assert out == ["Sure", ". ", "", ""]
    content, calls = scanner.finish({"get_time"})
    assert content == "" and [c.name for c in calls] == ["get_time"]
    scanner = ToolCallScanner()
    assert scanner.push("a <to") == "a " and scanner.push("p>") == "<top>" and scanner.finish({"x"}) == ("", [])


def test_history_with_calls_and_results_renders_for_chatml(tokenizer):
    messages = template_messages(
        [
            ChatMessage(role="user", content="Weather in Oslo?"),
            ChatMessage(
                role="assistant",
                content=None,
                tool_calls=[
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            ),
            ChatMessage(role="tool", tool_call_id="call_1", content='{"temp": 3}'),
        ]
    )
    text = render_chat(tokenizer, inline_tools(messages, [WEATHER]))
    assert text.startswith("<|im_start|>system\nYou can call these tools")
    assert '"name": "get_weather"' in text and '"maxLength": 10' in text
    call = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in text
    assert '<|im_start|>tool\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>' in text
    assert text.endswith("<|im_start|>assistant\n")


# --- 400s ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param", "code", "needle"),
    [
        (
            {"response_format": schema_format({"type": "foo"})},
            "response_format.json_schema.schema",
            "invalid_json_schema",
            "invalid JSON schema",
        ),
        (
            {"response_format": schema_format({"type": "string", "pattern": "(?=a)b"})},
            "response_format.json_schema.schema",
            "invalid_json_schema",
            "look-around",
        ),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            "invalid_value",
            "json_schema object",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "invalid_value",
            "'nope'",
        ),
        ({"tool_choice": "required"}, "tool_choice", "invalid_value", "requires tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "invalid_value", "duplicate"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
            "tools[0].function.parameters",
            "invalid_json_schema",
            "invalid JSON schema",
        ),
    ],
)
async def test_bad_structured_requests_are_400(client, fake_swarm, fields, param, code, needle):
    for stream in (False, True):
        r = await chat(client, stream=stream, **fields)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
        assert needle in error["message"]
    assert fake_swarm.sessions == []
