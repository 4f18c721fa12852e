"""ASGI middleware: an ``x-request-id`` on every response, the last-resort 500 (never a traceback), and the
request body size limit (checked before anything parses the body)."""

from __future__ import annotations

import json
import logging
import re
import uuid

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayError, InternalServerError, RequestTooLargeError
from gateway.request_context import request_id_var

logger = logging.getLogger(__name__)

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
HEADER = b"x-request-id"


class RequestIdMiddleware:
    """Names each request (keeping a sane incoming ``x-request-id``) and turns unhandled errors into a 500."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("[%s] unhandled error in %s %s", request_id, scope.get("method"), scope.get("path"))
            if not started:
                await _send_internal_error(send_with_id)
        finally:
            request_id_var.reset(token)


def _incoming_id(scope: Scope) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == HEADER:
            text = value.decode("latin-1")
            return text if _VALID_ID.match(text) else None
    return None


class _BodyTooLarge(StarletteHTTPException):
    """An HTTPException, so FastAPI's body reading lets it through to ``errors.translate`` (a 413)."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"The request body is larger than this gateway's limit of {max_bytes} bytes.")


class BodyLimitMiddleware:
    """Refuses a body over ``max_bytes`` with a 413: at once by its Content-Length, or (chunked uploads) as soon
    as the bytes read pass the limit, so a huge body is never buffered whole or parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_error(send, self._error())
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def send_started(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_started)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, self._error())

    def _error(self) -> RequestTooLargeError:
        return RequestTooLargeError(str(_BodyTooLarge(self.max_bytes).detail))


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_internal_error(send: Send) -> None:
    await _send_error(
        send, InternalServerError("internal error; the gateway log has details (search for the x-request-id)")
    )


async def _send_error(send: Send, err: GatewayError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
