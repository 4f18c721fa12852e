"""OpenAPI descriptions of the error responses every endpoint may return."""

from __future__ import annotations

from typing import Any

from gateway.schemas.common import ErrorResponse

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request (validation, context length exceeded)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "The request body is too large",
        429: "Rate limit reached for the API key, or the swarm is busy (see Retry-After)",
        500: "Internal error",
        502: "The swarm failed",
        503: "The swarm lacks blocks of this model (see Retry-After)",
        504: "The swarm did not answer in time",
    }.items()
}
