"""ServerMetrics: a block server's Prometheus metrics, served over HTTP on ``--metrics-port`` when asked.

The registry is the server's own (not prometheus_client's global one). Cache and session gauges are read from
the ``SessionRegistry`` at scrape time, so nothing has to remember to update them.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from server.sessions import SessionRegistry

logger = logging.getLogger(__name__)

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Steps (inference/forward/backward), their batch sizes and latency, refusals, cache use, open sessions."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.steps = Counter("petals_server_steps", "Requests computed, by kind.", ["kind"], registry=r)
        self.tokens = Counter(
            "petals_server_tokens", "Tokens computed (batch x length), by kind.", ["kind"], registry=r
        )
        self.batch_size = Histogram(
            "petals_server_batch_size", "Batch size of computed requests.", ["kind"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "petals_server_step_seconds",
            "Compute time of one request over the hosted blocks (queueing included).",
            ["kind"],
            buckets=_STEP_BUCKETS,
            registry=r,
        )
        self.errors = Counter("petals_server_errors", "Requests answered with an error, by code.", ["code"], registry=r)
        self.pushes = Counter(
            "petals_server_pushes",
            "Server-to-server push: outputs sent or failed, inputs received by push or filled by the client.",
            ["outcome"],
            registry=r,
        )
        self.cache_used = Gauge(
            "petals_server_cache_bytes_used", "Attention cache memory held by sessions.", registry=r
        )
        self.cache_budget = Gauge("petals_server_cache_bytes_budget", "Attention cache memory budget.", registry=r)
        self.sessions = Gauge("petals_server_open_sessions", "Open inference sessions.", registry=r)
        self.info = Info("petals_server", "What this server hosts.", registry=r)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def watch_sessions(self, sessions: SessionRegistry) -> None:
        self.cache_used.set_function(lambda: sessions.used_bytes)
        self.cache_budget.set_function(lambda: sessions.budget_bytes)
        self.sessions.set_function(lambda: len(sessions.sessions))

    def describe(self, **labels: str) -> None:
        self.info.info(labels)

    def observe_step(self, kind: str, batch_size: int, length: int, seconds: float) -> None:
        self.steps.labels(kind).inc()
        self.tokens.labels(kind).inc(batch_size * length)
        self.batch_size.labels(kind).observe(batch_size)
        self.step_seconds.labels(kind).observe(seconds)

    def observe_push(self, outcome: str) -> None:
        self.pushes.labels(outcome).inc()

    def observe_error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` from a daemon thread; returns the bound port (``port=0`` picks a free one)."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = int(self._http.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
