"""SSE framing of OpenAI streams: ``data: {json}`` events, an error event on failure, then ``[DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from gateway.errors import translate
from gateway.request_context import current_request_id

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
CLOSE_GRACE_S = 5.0
"""How long a closing stream waits for its swarm session to close."""


def sse_data(payload: BaseModel | dict[str, Any]) -> bytes:
    body = payload if isinstance(payload, dict) else payload.model_dump(mode="json")
    return b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def sse_events(
    events: AsyncIterator[BaseModel | dict[str, Any]], on_close: Callable[[], Awaitable[None]]
) -> AsyncIterator[bytes]:
    """Frame ``events``; a failure becomes one ``{"error": ...}`` event. ``on_close`` runs on every exit,
    including a client disconnect (cancellation), shielded so the swarm session really closes."""
    try:
        try:
            async for event in events:
                yield sse_data(event)
        except Exception as exc:
            err = translate(exc)
            logger.warning("[%s] stream failed after it started: %s -> %s", current_request_id(), exc, err.code)
            yield sse_data(err.body())
        yield DONE
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_GRACE_S):
            await on_close()


def event_source(stream: AsyncIterator[bytes]) -> EventSourceResponse:
    """The HTTP response for a stream (``\\n`` line ends, as OpenAI sends them)."""
    return EventSourceResponse(stream, sep="\n", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
