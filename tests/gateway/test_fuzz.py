"""Schemathesis throws schema-derived and malformed requests at every operation of the gateway's OpenAPI spec
(a real uvicorn server on loopback, with a fake swarm behind it): no 5xx, no hang. Bounded in cases and time."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.gateway.fakes import FakeSwarm, tiny_loaded_model

MAX_EXAMPLES = 30
CALL_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def gateway_url(tokenizer) -> Iterator[str]:
    model = tiny_loaded_model(tokenizer)
    swarm = FakeSwarm()

    async def swarm_factory(peers: list[str]) -> FakeSwarm:
        return swarm

    gateway_settings = GatewaySettings(
        initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmFake"], models=["tiny"], max_tokens_default=8,
        max_tokens_limit=32, request_timeout_s=5.0,
    )  # fmt: skip
    app = create_app(gateway_settings, swarm_factory=swarm_factory, model_loader=lambda ref, s: model)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the gateway did not start")
        time.sleep(0.1)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_no_server_errors_and_no_hangs(gateway_url):
    schema = schemathesis.openapi.from_url(f"{gateway_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5

    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case) -> None:
            began = time.monotonic()
            response = case.call(base_url=gateway_url, timeout=CALL_TIMEOUT_S)
            assert time.monotonic() - began < CALL_TIMEOUT_S
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            content_type = response.headers.get("content-type") or [""]
            content_type = content_type[0] if isinstance(content_type, list) else content_type
            if response.status_code >= 400 and content_type.startswith("application/json"):
                error = response.json().get("error")
                assert error is not None and isinstance(error.get("message"), str), response.text[:500]

        check()
