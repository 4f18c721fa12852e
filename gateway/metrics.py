"""GatewayMetrics: the gateway's Prometheus metrics and the rolling one-minute stats shown on the dashboard.

Each app owns its own ``CollectorRegistry`` (not prometheus_client's global one), so several apps can live in
one process (tests) without "duplicated timeseries" errors.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping
from statistics import median

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.schemas.swarm import GatewayStats

WINDOW_S = 60.0
GENERATION_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions"})
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Window:
    """(time, value) samples of the last ``WINDOW_S`` seconds."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float, now: float) -> None:
        self._samples.append((now, value))
        self._trim(now)

    def values(self, now: float) -> list[float]:
        self._trim(now)
        return [value for _, value in self._samples]

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - WINDOW_S:
            self._samples.popleft()


class GatewayMetrics:
    """Counters and histograms for ``/metrics``, plus windows for the ``/v1/swarm`` gateway stats."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "petals_gateway_requests",
            "HTTP requests by route and status.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "petals_gateway_time_to_first_token_seconds",
            "From a request's arrival to the first token's hidden states back from the swarm.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "petals_gateway_inter_token_latency_seconds",
            "Between consecutive decoding steps of one generation.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "petals_gateway_tokens_generated",
            "Tokens sampled (every row of a step; a finished choice keeps counting until its request ends).",
            ["model"],
            registry=r,
        )
        self.active_streams = Gauge("petals_gateway_active_streams", "Open SSE responses.", registry=r)
        self.active_generations = Gauge(
            "petals_gateway_active_generations", "Generations (streamed or not) holding a swarm session.", registry=r
        )
        self.missing_blocks = Gauge(
            "petals_gateway_swarm_missing_blocks",
            "Blocks of a model that no online server covers.",
            ["model"],
            registry=r,
        )
        self.swarm_servers = Gauge(
            "petals_gateway_swarm_servers", "Online servers announcing a model.", ["model"], registry=r
        )
        self._started = time.monotonic()
        self._requests = _Window()
        self._ttft = _Window()
        self._inter_token = _Window()
        self._tokens = _Window()
        self._requests_total = 0
        self._tokens_total = 0
        self._streams = 0
        self._generations = 0

    # --- recording -------------------------------------------------------------------------------------------
    def observe_request(self, endpoint: str, method: str, status: int) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        if endpoint in GENERATION_ENDPOINTS:
            self._requests_total += 1
            self._requests.add(1.0, time.monotonic())

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)
        self._ttft.add(seconds, time.monotonic())

    def observe_inter_token(self, model: str, seconds: float) -> None:
        self.inter_token.labels(model).observe(seconds)
        self._inter_token.add(seconds, time.monotonic())

    def observe_tokens(self, model: str, count: int) -> None:
        self.tokens.labels(model).inc(count)
        self._tokens_total += count
        self._tokens.add(float(count), time.monotonic())

    def stream_opened(self, delta: int) -> None:
        """+1 when an SSE response starts, -1 when it ends."""
        self._streams += delta
        self.active_streams.set(self._streams)

    def generation_opened(self, delta: int) -> None:
        """+1 when a generation opens its swarm session, -1 when it closes it."""
        self._generations += delta
        self.active_generations.set(self._generations)

    def set_coverage(self, coverage: Mapping[str, tuple[int, int]]) -> None:
        """{model: (missing blocks, online servers)}; models no longer announced drop out."""
        self.missing_blocks.clear()
        self.swarm_servers.clear()
        for model, (missing, servers) in coverage.items():
            self.missing_blocks.labels(model).set(missing)
            self.swarm_servers.labels(model).set(servers)

    # --- reading ---------------------------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def stats(self) -> GatewayStats:
        now = time.monotonic()
        uptime = now - self._started
        span = max(1.0, min(WINDOW_S, uptime))
        return GatewayStats(
            uptime_s=round(uptime, 1),
            window_s=round(span, 1),
            requests_total=self._requests_total,
            requests_per_s=round(len(self._requests.values(now)) / span, 3),
            ttft_ms_p50=_ms(median_or_none(self._ttft.values(now))),
            inter_token_ms_p50=_ms(median_or_none(self._inter_token.values(now))),
            tokens_total=self._tokens_total,
            tokens_per_s=round(sum(self._tokens.values(now)) / span, 2),
            active_streams=self._streams,
            active_generations=self._generations,
        )


def median_or_none(values: Iterable[float]) -> float | None:
    values = list(values)
    return median(values) if values else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
