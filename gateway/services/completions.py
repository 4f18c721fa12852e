"""Legacy text completions: a prompt string (or token ids) -> generation -> a response or a stream."""

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
from gateway.generation.tokenization import encode
from gateway.limits import Quota
from gateway.schemas.completions import CompletionChoice, CompletionRequest, CompletionResponse
from gateway.services.outcome import collect, completion_logprobs, usage
from gateway.services.params import build_params
from gateway.state import GatewayState
from gateway.streaming import sse_events


async def create_completion(
    state: GatewayState, req: CompletionRequest, quota: Quota | None = None
) -> CompletionResponse | AsyncIterator[bytes]:
    """A finished response, or (``req.stream``) SSE bytes whose first token is already computed.

    ``quota``: the caller's tokens per minute, charged once the request is known to be valid."""
    model = state.model(req.model)
    if req.suffix:
        raise InvalidRequestError("suffix is not supported", param="suffix", code="unsupported_value")
    if req.echo and req.logprobs is not None:
        raise InvalidRequestError("echo with logprobs is not supported", param="echo", code="unsupported_value")
    prompt_ids = await asyncio.to_thread(_prompt_ids, model, req.prompt)
    params = build_params(
        state.settings,
        model,
        len(prompt_ids),
        req,
        max_tokens=req.max_tokens,
        logprobs=req.logprobs,
        prompt_param="prompt",
    )
    if quota is not None:
        quota.charge_tokens(len(prompt_ids) + params.max_tokens * params.n)
    echo = model.tokenizer.decode(prompt_ids) if req.echo else ""
    source = generate(state.swarm, model, prompt_ids, params)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        pump = await started_pump(source)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        head = _Head(req.model, completion_id, created)
        return sse_events(_chunks(pump, model, params, head, echo, len(prompt_ids), include_usage), pump.aclose)
    results = await collect(source, params.n)
    choices = [
        CompletionChoice(
            index=i,
            text=echo + r.text,
            logprobs=completion_logprobs(model, r.tokens, len(echo)) if params.logprobs is not None else None,
            finish_reason=r.finish_reason,  # type: ignore[arg-type]
        )
        for i, r in enumerate(results)
    ]
    return CompletionResponse(
        id=completion_id,
        created=created,
        model=req.model,
        choices=choices,
        usage=usage(len(prompt_ids), sum(len(r.tokens) for r in results)),
    )


def _prompt_ids(model: LoadedModel, prompt: str | list[str] | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return encode(model.tokenizer, prompt, add_special_tokens=True)
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return encode(model.tokenizer, prompt[0], add_special_tokens=True)
    if prompt and all(isinstance(t, int) for t in prompt):
        if not all(0 <= t < model.vocab_size for t in prompt):  # type: ignore[operator]
            raise InvalidRequestError("prompt token id out of range", param="prompt", code="invalid_value")
        return list(prompt)  # type: ignore[arg-type]
    raise InvalidRequestError(
        "prompt must be a string, a list of one string, or a list of token ids",
        param="prompt",
        code="invalid_value",
    )


class _Head:
    """The fields every chunk of one completion repeats."""

    def __init__(self, model: str, completion_id: str, created: int):
        self.base = {"id": completion_id, "object": "text_completion", "created": created, "model": model}

    def chunk(self, choices: list[dict[str, Any]], usage_: Any = None) -> dict[str, Any]:
        body = {**self.base, "choices": choices}
        if usage_ is not None:
            body["usage"] = usage_.model_dump()
        return body


async def _chunks(
    pump: Pump[Any],
    model: LoadedModel,
    params: GenerationParams,
    head: _Head,
    echo: str,
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[dict[str, Any]]:
    offsets = [len(echo)] * params.n
    if echo:
        for i in range(params.n):
            yield head.chunk([{"index": i, "text": echo, "logprobs": None, "finish_reason": None}])
    completion_tokens = 0
    async for step in pump:
        for update in step:
            completion_tokens += 1
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(model, [update.token], offsets[update.index]).model_dump()
            offsets[update.index] += len(update.text)
            if update.text or logprobs is not None or update.finish_reason is not None:
                yield head.chunk(
                    [
                        {
                            "index": update.index,
                            "text": update.text,
                            "logprobs": logprobs,
                            "finish_reason": update.finish_reason,
                        }
                    ]
                )
    if include_usage:
        yield head.chunk([], usage(prompt_tokens, completion_tokens))
