"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from gateway.api.deps import StateDep, require_api_key
from gateway.api.responses import ERRORS
from gateway.schemas.chat import ChatCompletionRequest, ChatCompletionResponse
from gateway.services.chat import create_chat_completion
from gateway.streaming import event_source

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["chat"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def chat_completions(body: ChatCompletionRequest, state: StateDep) -> Response:
    """Chat completion; with ``stream: true`` an SSE stream of ``chat.completion.chunk`` objects."""
    result = await create_chat_completion(state, body)
    if isinstance(result, ChatCompletionResponse):
        return JSONResponse(result.model_dump(mode="json"))
    return event_source(result)
