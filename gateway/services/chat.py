"""Chat completions: messages -> chat template -> generation -> a response or a stream of chunks."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import InvalidRequestError
from gateway.generation.generator import GenerationParams, generate
from gateway.generation.model import LoadedModel
from gateway.generation.pump import Pump, started_pump
from gateway.generation.tokenization import ChatTemplateError, encode, render_chat
from gateway.generation.tool_format import (
    ParsedCall,
    ToolCallScanner,
    inline_tools,
    native_tool_messages,
    parse_tool_calls,
    template_supports_tools,
)
from gateway.limits import Quota
from gateway.schemas.chat import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChunkDelta,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from gateway.services.outcome import chat_logprobs, collect, usage
from gateway.services.params import build_params
from gateway.services.structured import ToolPlan, compile_grammar, plan_tools
from gateway.state import GatewayState
from gateway.streaming import sse_events


async def create_chat_completion(
    state: GatewayState, req: ChatCompletionRequest, quota: Quota | None = None
) -> ChatCompletionResponse | AsyncIterator[bytes]:
    """A finished response, or (``req.stream``) SSE bytes whose first token is already computed.

    ``quota``: the caller's tokens per minute, charged once the request is known to be valid."""
    model = state.model(req.model)
    if len(req.messages) > state.settings.max_messages:
        raise InvalidRequestError(
            f"{len(req.messages)} messages; this gateway allows at most {state.settings.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    plan = plan_tools(req)
    messages = template_messages(req.messages)
    prompt_ids = await asyncio.to_thread(_encode_chat, model, messages, plan.tools)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("top_logprobs requires logprobs=true", param="top_logprobs")
    params = build_params(
        state.settings,
        model,
        len(prompt_ids),
        req,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        prompt_param="messages",
    )
    grammar = await compile_grammar(model, req, plan)
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    if quota is not None:
        quota.charge_tokens(len(prompt_ids) + params.max_tokens * params.n)
    source = generate(state.swarm, model, prompt_ids, params)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        pump = await started_pump(source)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _chunks(pump, model, params, plan, req.model, completion_id, created, len(prompt_ids), include_usage)
        return sse_events(chunks, pump.aclose)
    results = await collect(source, params.n)
    choices = []
    for i, r in enumerate(results):
        content: str | None = r.text
        calls: list[ParsedCall] = []
        if plan.parses_calls and r.finish_reason == "stop":
            content, calls = parse_tool_calls(r.text, set(plan.names))
            calls = calls if plan.parallel else calls[:1]
        choices.append(
            ChatCompletionChoice(
                index=i,
                message=AssistantMessage(content=content, tool_calls=_tool_calls(calls) if calls else None),
                logprobs=ChatCompletionLogprobs(content=chat_logprobs(model, r.tokens))
                if params.logprobs is not None
                else None,
                finish_reason="tool_calls" if calls else r.finish_reason,  # type: ignore[arg-type]
            )
        )
    return ChatCompletionResponse(
        id=completion_id,
        created=created,
        model=req.model,
        choices=choices,
        usage=usage(len(prompt_ids), sum(len(r.tokens) for r in results)),
    )


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Wire messages -> the plain dicts chat templates expect (developer -> system, text parts joined)."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": _text(message, i),
        }
        for key in ("name", "tool_call_id", "tool_calls"):
            value = getattr(message, key)
            if value is not None:
                entry[key] = value
        out.append(entry)
    return out


def _text(message: ChatMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"content part type {part.type!r} is not supported; only text parts are",
                param=f"messages[{index}].content[{j}]",
                code="invalid_value",
            )
        texts.append(part.text)
    return "\n".join(texts)


def _encode_chat(model: LoadedModel, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[int]:
    """Tools and tool-call history go through the template when it knows them, else as text (tool_format)."""
    if template_supports_tools(getattr(model.tokenizer, "chat_template", None)):
        messages, template_tools = native_tool_messages(messages), tools or None
    else:
        messages, template_tools = inline_tools(messages, tools), None
    try:
        text = render_chat(model.tokenizer, messages, template_tools)
    except ChatTemplateError as e:
        raise InvalidRequestError(str(e), param="messages", code="invalid_value") from e
    return encode(model.tokenizer, text, add_special_tokens=False)


async def _chunks(
    pump: Pump[Any],
    model: LoadedModel,
    params: GenerationParams,
    plan: ToolPlan,
    model_name: str,
    completion_id: str,
    created: int,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's chunk sequence: a role chunk per choice, content deltas (and tool-call deltas once a call
    is complete), a finish chunk, then usage."""

    def chunk(choice: ChatCompletionChunkChoice | None, usage_=None) -> dict[str, Any]:
        body = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model_name,
            choices=[choice] if choice else [],
            usage=usage_,
        ).model_dump(mode="json")
        for c in body["choices"]:
            c["delta"] = _without_nones(c["delta"])
        return body

    for i in range(params.n):
        yield chunk(ChatCompletionChunkChoice(index=i, delta=ChunkDelta(role="assistant", content="")))
    completion_tokens = 0
    scanners = [ToolCallScanner() if plan.parses_calls else None for _ in range(params.n)]
    async for step in pump:
        for update in step:
            completion_tokens += 1
            logprobs = None
            if params.logprobs is not None:
                logprobs = ChatCompletionLogprobs(content=chat_logprobs(model, [update.token]))
            scanner = scanners[update.index]
            text = scanner.push(update.text) if scanner is not None else update.text
            if text or logprobs is not None:
                delta = ChunkDelta(content=text)
                yield chunk(ChatCompletionChunkChoice(index=update.index, delta=delta, logprobs=logprobs))
            if update.finish_reason is None:
                continue
            finish = update.finish_reason
            if scanner is not None:
                # Only a choice that ended by itself is read for calls (as in the non-streamed response).
                tail, calls = scanner.finish(set(plan.names) if finish == "stop" else set())
                if tail:
                    yield chunk(ChatCompletionChunkChoice(index=update.index, delta=ChunkDelta(content=tail)))
                for delta in _call_deltas(calls if plan.parallel else calls[:1]):
                    yield chunk(ChatCompletionChunkChoice(index=update.index, delta=delta))
                finish = "tool_calls" if calls else finish
            yield chunk(
                ChatCompletionChunkChoice(index=update.index, delta=ChunkDelta(), finish_reason=finish)  # type: ignore[arg-type]
            )
    if include_usage:
        yield chunk(None, usage(prompt_tokens, completion_tokens))


def _call_deltas(calls: list[ParsedCall]) -> list[ChunkDelta]:
    """OpenAI's tool-call deltas: per call, one with its id, type and name (empty arguments), then the arguments."""
    deltas = []
    for i, call in enumerate(calls):
        head = ToolCallDelta(
            index=i, id=call.id, type="function", function=FunctionCallDelta(name=call.name, arguments="")
        )
        body = ToolCallDelta(index=i, function=FunctionCallDelta(arguments=call.arguments))
        deltas += [ChunkDelta(tool_calls=[head]), ChunkDelta(tool_calls=[body])]
    return deltas


def _without_nones(value: Any) -> Any:
    """Deltas carry only the fields they set (OpenAI omits the rest), nested tool-call fields included."""
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nones(v) for v in value]
    return value
