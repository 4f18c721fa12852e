"""Collecting ChoiceUpdates into finished choices, and rendering token logprobs in OpenAI's two formats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.generation.generator import ChoiceUpdate, TokenInfo
from gateway.generation.model import LoadedModel
from gateway.schemas.common import TokenLogprob, TopLogprob, Usage
from gateway.schemas.completions import CompletionLogprobs


@dataclass
class ChoiceResult:
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None


async def collect(updates: AsyncIterator[list[ChoiceUpdate]], n: int) -> list[ChoiceResult]:
    """Run a generation to its end and gather each choice's text, tokens and finish reason."""
    results = [ChoiceResult() for _ in range(n)]
    parts: list[list[str]] = [[] for _ in range(n)]
    async for step in updates:
        for update in step:
            parts[update.index].append(update.text)
            results[update.index].tokens.append(update.token)
            results[update.index].finish_reason = update.finish_reason
    for result, texts in zip(results, parts, strict=True):
        result.text = "".join(texts)
    return results


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def chat_logprobs(model: LoadedModel, tokens: list[TokenInfo]) -> list[TokenLogprob]:
    """Chat format: one entry per token with its text, bytes and alternatives. End-of-sequence tokens are not
    listed: they are not part of the content, so the entries' tokens spell exactly the text returned."""
    entries = []
    for info in tokens:
        if info.token_id in model.eos_token_ids:
            continue
        text, raw = model.token_text.get(info.token_id)
        top = []
        for token_id, logprob in info.top:
            alt_text, alt_raw = model.token_text.get(token_id)
            top.append(TopLogprob(token=alt_text, logprob=logprob, bytes=alt_raw))
        entries.append(TokenLogprob(token=text, logprob=info.logprob or 0.0, bytes=raw, top_logprobs=top))
    return entries


def completion_logprobs(model: LoadedModel, tokens: list[TokenInfo], text_offset: int) -> CompletionLogprobs:
    """Legacy format: parallel lists; ``text_offset`` is where each token's text starts in the output."""
    out = CompletionLogprobs()
    offset = text_offset
    for info in tokens:
        text, _ = model.token_text.get(info.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(info.logprob)
        out.top_logprobs.append({model.token_text.get(t)[0]: lp for t, lp in info.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out
