"""The gateway's error tree and the one place where every failure becomes an OpenAI-shaped error.

    GatewayError                        status  type                     code
    ├── InvalidRequestError             400     invalid_request_error    (varies; param names the field)
    │   └── ContextLengthExceededError  400     invalid_request_error    context_length_exceeded
    │       (a GrammarError, i.e. a schema that cannot be enforced, becomes a 400 with code invalid_json_schema)
    ├── AuthenticationError             401     invalid_request_error    invalid_api_key
    ├── ModelNotFoundError              404     invalid_request_error    model_not_found
    ├── RequestTooLargeError            413     invalid_request_error    request_too_large
    ├── RateLimitError                  429     requests | tokens        rate_limit_exceeded  (Retry-After)
    ├── OverloadedError                 429     rate_limit_error         server_busy      (Retry-After)
    ├── InternalServerError             500     api_error                internal_error
    ├── UpstreamError                   502     api_error                (swarm error code)
    ├── ServiceUnavailableError         503     service_unavailable      (swarm error code) (Retry-After)
    └── GatewayTimeoutError             504     timeout                  timeout

``translate`` maps swarm errors, timeouts and framework errors onto this tree; exception handlers and the
streaming error event both go through it, so a failure is described the same way everywhere.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.generation.constraint import GrammarError
from swarm import errors as swarm_errors

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5
"""Seconds a client is asked to wait after a 429/503: long enough for a server to (re)join the swarm."""


class GatewayError(Exception):
    status_code = 500
    type = "api_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequestError(GatewayError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(GatewayError):
    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class ModelNotFoundError(GatewayError):
    status_code = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class RequestTooLargeError(GatewayError):
    status_code = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(GatewayError):
    """A key used up its requests or tokens per minute; ``type`` names which, as OpenAI's 429 body does."""

    status_code = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after_s: float | None):
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
        super().__init__(message, headers=headers)
        self.type = kind


class OverloadedError(GatewayError):
    status_code = 429
    type = "rate_limit_error"
    default_code = "server_busy"


class InternalServerError(GatewayError):
    status_code = 500
    type = "api_error"
    default_code = "internal_error"


class UpstreamError(GatewayError):
    status_code = 502
    type = "api_error"
    default_code = "swarm_error"


class ServiceUnavailableError(GatewayError):
    status_code = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class GatewayTimeoutError(GatewayError):
    status_code = 504
    type = "timeout"
    default_code = "timeout"


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


def translate(exc: BaseException) -> GatewayError:
    """Map any exception onto the gateway's tree (unknown ones become a generic 500)."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, GrammarError):
        return InvalidRequestError(exc.message, param=exc.param, code="invalid_json_schema")
    if isinstance(exc, swarm_errors.MissingBlocksError | swarm_errors.ModelNotFoundError):
        # The model is configured here but the swarm does not serve it (fully) right now: come back later.
        return ServiceUnavailableError(exc.message, code=exc.code, headers=_retry_after())
    if isinstance(exc, swarm_errors.ServerBusyError):
        return OverloadedError(exc.message, headers=_retry_after())
    if isinstance(exc, swarm_errors.BadRequestError):
        return InvalidRequestError(exc.message, code=exc.code)
    if isinstance(exc, swarm_errors.SwarmError):
        return UpstreamError(exc.message, code=exc.code)
    if isinstance(exc, TimeoutError):
        return GatewayTimeoutError("the swarm did not answer in time")
    if isinstance(exc, RequestValidationError):
        return _from_validation(exc)
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 413:
        return RequestTooLargeError(str(exc.detail))
    if isinstance(exc, StarletteHTTPException):
        cls = ModelNotFoundError if exc.status_code == 404 else InvalidRequestError
        err = cls(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        err.status_code = exc.status_code
        return err
    return InternalServerError("internal error; the gateway log has details (search for the x-request-id)")


def _from_validation(exc: RequestValidationError) -> InvalidRequestError:
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("invalid request")
    first = errors[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = _param_path(loc) if loc and first.get("type") != "json_invalid" else None
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    return InvalidRequestError(message, param=param, code=str(first.get("type") or "invalid_value"))


def _param_path(loc: list[Any]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union-branch tags like 'str' are dropped."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not text:
            text = str(part)
        elif part in ("str", "list[str]", "function-after", "list", "dict"):
            continue
        else:
            text += f".{part}"
    return text


def error_response(err: GatewayError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    err = translate(exc)
    request_id = getattr(request.state, "request_id", "-")
    if err.status_code >= 500:
        logger.warning("[%s] %s %s -> %d %s", request_id, request.method, request.url.path, err.status_code, exc)
    else:
        logger.info("[%s] %s %s -> %d %s", request_id, request.method, request.url.path, err.status_code, err.message)
    return error_response(err)


def install_error_handlers(app: FastAPI) -> None:
    """Route every expected exception type through ``translate``; ``middleware`` catches the rest."""
    for exc_type in (
        GatewayError,
        GrammarError,
        swarm_errors.SwarmError,
        TimeoutError,
        RequestValidationError,
        StarletteHTTPException,
    ):
        app.add_exception_handler(exc_type, _handle)
