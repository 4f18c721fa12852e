"""Where the gateway's metrics are measured: an ASGI middleware (requests, SSE streams) and a swarm client
wrapper (time to first token, inter-token latency, tokens), so no handler or generation code has to know.

Time to first token runs from the request's arrival (a context variable set by the middleware and copied into
the generation task) to the first step's hidden states coming back; sampling that token adds a few ms more.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import torch
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.generation.protocols import InferenceSessionLike, SwarmClientLike
from gateway.metrics import GatewayMetrics
from swarm.records import ModelCoverage
from swarm.span_tensors import SpanTensors

request_started_var: ContextVar[float | None] = ContextVar("request_started", default=None)


class MetricsMiddleware:
    """Counts every HTTP request by route template (not raw path: bounded label values) and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = request_started_var.set(time.perf_counter())
        status = 500  # what an exception escaping the app becomes (RequestIdMiddleware answers it)
        streaming = False

        async def send_observed(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(b"text/event-stream"):
                    streaming = True
                    self.metrics.stream_opened(+1)
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            if streaming:
                self.metrics.stream_opened(-1)
            self.metrics.observe_request(endpoint_label(scope), scope.get("method", ""), status)
            request_started_var.reset(token)


def endpoint_label(scope: Scope) -> str:
    """The matched route's path template (``/v1/models/{model_id:path}``), or ``unmatched``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservedSession:
    """Wraps one inference session: the first step is the time to first token, later ones inter-token gaps."""

    def __init__(self, inner: InferenceSessionLike, model_id: str, metrics: GatewayMetrics, opened: float):
        self._inner = inner
        self._model_id = model_id
        self._metrics = metrics
        self._started = request_started_var.get() or opened
        self._last: float | None = None

    @property
    def position(self) -> int:
        return self._inner.position

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        out = await self._inner.step(hidden)  # [B, S, D]
        now = time.perf_counter()
        if self._last is None:
            self._metrics.observe_first_token(self._model_id, now - self._started)
        else:
            self._metrics.observe_inter_token(self._model_id, now - self._last)
        self._last = now
        self._metrics.observe_tokens(self._model_id, int(out.shape[0]))  # one token sampled per row
        return out


class ObservedSwarm:
    """A ``SwarmClientLike`` that measures generations; everything else passes through to the real client."""

    def __init__(self, inner: SwarmClientLike, metrics: GatewayMetrics):
        self._inner = inner
        self._metrics = metrics

    async def model_coverage(self, model_id: str) -> ModelCoverage:
        return await self._inner.model_coverage(model_id)

    @asynccontextmanager
    async def inference_session(
        self,
        model_id: str,
        *,
        max_length: int,
        batch_size: int,
        extras: SpanTensors | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[ObservedSession]:
        opened = time.perf_counter()
        async with self._inner.inference_session(
            model_id, max_length=max_length, batch_size=batch_size, extras=extras, adapter=adapter
        ) as session:
            self._metrics.generation_opened(+1)
            try:
                yield ObservedSession(session, model_id, self._metrics, opened)
            finally:
                self._metrics.generation_opened(-1)

    async def shutdown(self) -> None:
        await self._inner.shutdown()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
