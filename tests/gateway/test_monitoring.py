"""/v1/swarm, /metrics and /dashboard through the ASGI app, with a fake swarm and a fake inspector."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.settings import GatewaySettings
from swarm.messages import ServerInfoResult
from swarm.probe import ProbeResult
from swarm.records import ModelCoverage, RemoteServer, ServerRecord, ServerState
from tests.gateway.fakes import MODEL_ID, NUM_BLOCKS

PEER_A, PEER_B = "QmAlice" + "a" * 39, "QmBob" + "b" * 41


class FakeInspector:
    """Two servers split the fake model; a third model is announced by someone else; bob does not answer."""

    def __init__(self) -> None:
        self.lookups = 0
        self.fail = False

    async def served_models(self) -> dict[str, ModelCoverage]:
        self.lookups += 1
        if self.fail:
            raise RuntimeError("dht is down")
        half = NUM_BLOCKS // 2
        servers = [
            RemoteServer(PEER_A, ServerRecord(model_id=MODEL_ID, start=0, end=half, state=ServerState.ONLINE,
                                              throughput=4.0, public_name="alice", cache_tokens_left=100)),
            RemoteServer(PEER_B, ServerRecord(model_id=MODEL_ID, start=half, end=NUM_BLOCKS, state=ServerState.ONLINE,
                                              throughput=6.0, public_name="bob<script>", cache_tokens_left=50)),
        ]  # fmt: skip
        return {
            MODEL_ID: ModelCoverage(MODEL_ID, NUM_BLOCKS, servers=servers),
            "other": ModelCoverage("other", 3, missing=[1, 2]),
        }

    async def probe(self, peer_ids: Iterable[str]) -> dict[str, ProbeResult]:
        results = {}
        for peer in peer_ids:
            if peer == PEER_A:
                results[peer] = ProbeResult(peer, ServerInfoResult(cache_tokens_left=90, active_sessions=2), 0.0042)
            else:
                results[peer] = ProbeResult(peer, error="no answer in 2s")
        return results


@pytest.fixture
def inspector() -> FakeInspector:
    return FakeInspector()


@pytest.fixture
def make_monitored(fake_swarm, loaded_model, inspector):
    @asynccontextmanager
    async def factory(settings: GatewaySettings) -> AsyncIterator[httpx.AsyncClient]:
        async def swarm_factory(peers: list[str]):
            return fake_swarm

        app = create_app(
            settings,
            swarm_factory=swarm_factory,
            model_loader=lambda ref, s: loaded_model,
            inspector_factory=lambda swarm: inspector,
        )
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                yield client

    return factory


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}; parsing it at all is part of the test."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_swarm_json_shows_models_servers_and_probes(make_monitored, settings):
    async with make_monitored(settings) as client:
        r = await client.get("/v1/swarm")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["model_id"] for m in body["models"]] == [MODEL_ID, "other"]  # ours first
    ours, other = body["models"]
    assert ours["complete"] and ours["status"] == "ready" and ours["served_here"]
    assert [b["servers"] for b in ours["blocks"]] == [1] * NUM_BLOCKS
    assert [b["throughput"] for b in ours["blocks"]] == [4.0, 4.0, 6.0, 6.0]
    assert other["status"] == "missing blocks 1:3" and other["missing_ranges"] == [{"start": 1, "end": 3}]
    assert not other["served_here"]
    alice, bob = body["servers"]
    assert alice["public_name"] == "alice" and alice["reachable"] and alice["latency_ms"] == 4.2
    assert alice["cache_tokens_left"] == 90 and alice["active_sessions"] == 2  # live, not as announced
    assert not bob["reachable"] and bob["cache_tokens_left"] == 50 and bob["probe_error"]
    assert body["gateway"]["requests_total"] == 0 and body["error"] is None


async def test_snapshot_is_cached_and_lookup_failures_are_reported(make_monitored, settings, inspector):
    async with make_monitored(settings) as client:
        await client.get("/v1/swarm")
        await client.get("/v1/swarm")
        assert inspector.lookups == 1
    inspector.fail = True
    async with make_monitored(settings) as client:
        r = await client.get("/v1/swarm")
    assert r.status_code == 200
    assert "dht is down" in r.json()["error"] and r.json()["models"] == []


async def test_metrics_parse_and_move_after_requests(make_monitored, settings):
    async with make_monitored(settings) as client:
        before = samples((await client.get("/metrics")).text)
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200
        r = await client.get("/metrics")
        stats = (await client.get("/v1/swarm")).json()["gateway"]
    assert r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)
    chat = (
        "petals_gateway_requests_total",
        (("endpoint", "/v1/chat/completions"), ("method", "POST"), ("status", "200")),
    )
    assert before.get(chat, 0) == 0 and after[chat] == 2
    model = (("model", MODEL_ID),)
    assert after[("petals_gateway_tokens_generated_total", model)] == 10
    assert after[("petals_gateway_time_to_first_token_seconds_count", model)] == 2
    assert after[("petals_gateway_inter_token_latency_seconds_count", model)] == 8
    assert after[("petals_gateway_active_streams", ())] == 0
    assert after[("petals_gateway_active_generations", ())] == 0
    assert after[("petals_gateway_swarm_missing_blocks", model)] == 0
    assert after[("petals_gateway_swarm_missing_blocks", (("model", "other"),))] == 2
    assert stats["requests_total"] == 2 and stats["tokens_total"] == 10
    assert stats["ttft_ms_p50"] is not None and stats["tokens_per_s"] > 0


async def test_unknown_paths_share_one_label(make_monitored, settings):
    async with make_monitored(settings) as client:
        await client.get("/no/such/path")
        await client.get("/another/one")
        text = (await client.get("/metrics")).text
    assert (
        samples(text)[
            ("petals_gateway_requests_total", (("endpoint", "unmatched"), ("method", "GET"), ("status", "404")))
        ]
        == 2
    )


async def test_dashboard_is_plain_html_that_polls_the_swarm(make_monitored, settings):
    async with make_monitored(settings) as client:
        r = await client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/swarm" in r.text and "innerHTML" not in r.text  # names from the DHT are never parsed as HTML


async def test_monitoring_is_open_with_api_keys_by_default(make_monitored, settings):
    keyed = settings.model_copy(update={"api_keys": ["k"]})
    async with make_monitored(keyed) as client:
        for path in ("/health", "/metrics", "/dashboard", "/v1/swarm"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.get("/v1/models")).status_code == 401


async def test_closed_monitoring_needs_the_key(make_monitored, settings):
    closed = settings.model_copy(update={"api_keys": ["k"], "open_monitoring": False})
    async with make_monitored(closed) as client:
        for path in ("/health", "/metrics", "/dashboard", "/v1/swarm"):
            assert (await client.get(path)).status_code == 401, path
            r = await client.get(path, headers={"Authorization": "Bearer k"})
            assert r.status_code == 200, path
