"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gateway.api.deps import QuotaDep, StateDep
from gateway.api.responses import ERRORS
from gateway.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from gateway.services.chat import create_chat_completion
from gateway.streaming import event_source

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, state: StateDep, quota: QuotaDep) -> Response:
    """Chat completion; with ``stream: true`` an SSE stream of ``chat.completion.chunk`` objects."""
    result = await create_chat_completion(state, body, quota)
    if isinstance(result, ChatCompletionResponse):
        return JSONResponse(result.model_dump(mode="json"))
    return event_source(result)
