"""Shared by the gateway benchmarks: one streamed request through the OpenAI SDK, timed chunk by chunk."""

from __future__ import annotations

import time
from dataclasses import dataclass

from openai import AsyncOpenAI


@dataclass
class TimedStream:
    began: float
    first: float
    """When the first content chunk arrived."""
    last: float
    """When the chunk carrying the finish reason arrived."""
    tokens: int
    text: str

    @property
    def ttft_s(self) -> float:
        return self.first - self.began

    @property
    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / max(self.last - self.first, 1e-9)


async def timed_stream(client: AsyncOpenAI, expect_tokens: int, **request) -> TimedStream:
    """Stream ``request`` (with usage), asserting that exactly ``expect_tokens`` completion tokens came back."""
    began = time.perf_counter()
    stream = await client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    first = last = None
    parts: list[str] = []
    tokens = 0
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or now
            parts.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert first is not None and last is not None and tokens == expect_tokens, (first, last, tokens)
    return TimedStream(began, first, last, tokens, "".join(parts))
