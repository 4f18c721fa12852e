"""Chat completions: messages -> chat template -> generation -> a response or a stream of chunks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import InvalidRequestError
from gateway.generation.generator import GenerationParams, generate
from gateway.generation.model import LoadedModel
from gateway.generation.pump import Pump, started_pump
from gateway.generation.tokenization import ChatTemplateError, encode, render_chat
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
)
from gateway.services.outcome import chat_logprobs, collect, usage
from gateway.services.params import build_params
from gateway.state import GatewayState
from gateway.streaming import sse_events


async def create_chat_completion(
    state: GatewayState, req: ChatCompletionRequest
) -> ChatCompletionResponse | AsyncIterator[bytes]:
    """A finished response, or (``req.stream``) SSE bytes whose first token is already computed."""
    model = state.model(req.model)
    messages = template_messages(req.messages)
    prompt_ids = await asyncio.to_thread(_encode_chat, model, messages)
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
    source = generate(state.swarm, model, prompt_ids, params)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        pump = await started_pump(source)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _chunks(
            pump, model, params, req.model, completion_id, created, len(prompt_ids), include_usage
        )
        return sse_events(chunks, pump.aclose)
    results = await collect(source, params.n)
    choices = [
        ChatCompletionChoice(
            index=i,
            message=AssistantMessage(content=r.text),
            logprobs=ChatCompletionLogprobs(content=chat_logprobs(model, r.tokens))
            if params.logprobs is not None
            else None,
            finish_reason=r.finish_reason,  # type: ignore[arg-type]
        )
        for i, r in enumerate(results)
    ]
    return ChatCompletionResponse(
        id=completion_id,
        created=created,
        model=req.model,
        choices=choices,
        usage=usage(len(prompt_ids), sum(len(r.tokens) for r in results)),
    )


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


def _encode_chat(model: LoadedModel, messages: list[dict[str, Any]]) -> list[int]:
    try:
        text = render_chat(model.tokenizer, messages)
    except ChatTemplateError as e:
        raise InvalidRequestError(str(e), param="messages", code="invalid_value") from e
    return encode(model.tokenizer, text, add_special_tokens=False)


async def _chunks(
    pump: Pump[Any],
    model: LoadedModel,
    params: GenerationParams,
    model_name: str,
    completion_id: str,
    created: int,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI's chunk sequence: a role chunk per choice, content deltas, a finish chunk, then usage."""

    def chunk(choice: ChatCompletionChunkChoice | None, usage_=None) -> dict[str, Any]:
        body = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model_name,
            choices=[choice] if choice else [],
            usage=usage_,
        ).model_dump(mode="json")
        for c in body["choices"]:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return body

    for i in range(params.n):
        yield chunk(ChatCompletionChunkChoice(index=i, delta=ChunkDelta(role="assistant", content="")))
    completion_tokens = 0
    async for step in pump:
        for update in step:
            completion_tokens += 1
            logprobs = None
            if params.logprobs is not None:
                logprobs = ChatCompletionLogprobs(content=chat_logprobs(model, [update.token]))
            if update.text or logprobs is not None:
                delta = ChunkDelta(content=update.text)
                yield chunk(ChatCompletionChunkChoice(index=update.index, delta=delta, logprobs=logprobs))
            if update.finish_reason is not None:
                finish = update.finish_reason
                yield chunk(
                    ChatCompletionChunkChoice(index=update.index, delta=ChunkDelta(), finish_reason=finish)
                )  # type: ignore[arg-type]
    if include_usage:
        yield chunk(None, usage(prompt_tokens, completion_tokens))
