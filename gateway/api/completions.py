"""POST /v1/completions (legacy)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from gateway.api.deps import QuotaDep, StateDep
from gateway.api.responses import ERRORS
from gateway.schemas.completions import CompletionRequest, CompletionResponse
from gateway.services.completions import create_completion
from gateway.streaming import event_source

router = APIRouter(tags=["completions"])


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
)
async def completions(body: CompletionRequest, state: StateDep, quota: QuotaDep) -> Response:
    """Legacy text completion; with ``stream: true`` an SSE stream of ``text_completion`` chunks."""
    result = await create_completion(state, body, quota)
    if isinstance(result, CompletionResponse):
        return JSONResponse(result.model_dump(mode="json"))
    return event_source(result)
