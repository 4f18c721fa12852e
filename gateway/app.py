"""create_app: the FastAPI application; its lifespan owns the swarm client, the models and the dev swarm."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from gateway.api import chat, completions, health, models, monitoring
from gateway.api.deps import key_digest
from gateway.embedded import EmbeddedSwarm, ready_banner, wait_until_served
from gateway.errors import install_error_handlers
from gateway.generation.model import LoadedModel, ModelLoader, load_model
from gateway.generation.protocols import SwarmClientLike
from gateway.generation.variants import parse_prompts_option, prompt_variant, public_id
from gateway.instrumentation import MetricsMiddleware, ObservedSwarm
from gateway.limits import RateLimiter
from gateway.metrics import GatewayMetrics
from gateway.middleware import BodyLimitMiddleware, RequestIdMiddleware
from gateway.services.swarm_view import SwarmInspectorLike, SwarmView
from gateway.settings import GatewaySettings
from gateway.state import GatewayState

logger = logging.getLogger(__name__)

SwarmFactory = Callable[[list[str]], Awaitable[SwarmClientLike]]
"""initial peers -> a connected swarm client."""

InspectorFactory = Callable[[SwarmClientLike], SwarmInspectorLike]
"""the connected swarm client -> what /v1/swarm reads (every announced model, server probes)."""


async def connect_swarm(
    initial_peers: list[str],
    swarm_secret: str | None = None,
    spot_check_probability: float | None = None,
    push: bool | None = None,
) -> SwarmClientLike:
    """The real swarm client (imported here so that tests with a fake never load it); None keeps its default."""
    from swarm.client import ClientConfig, SwarmClient

    config = ClientConfig(initial_peers=initial_peers, swarm_secret=swarm_secret)
    if spot_check_probability is not None:
        config.spot_check_probability = spot_check_probability
    if push is not None:
        config.push = push
    return await SwarmClient.create(config)


def connect_inspector(swarm: SwarmClientLike) -> SwarmInspectorLike:
    """The real inspector over the real client (imported here for the same reason as ``connect_swarm``)."""
    from swarm.probe import SwarmInspector

    return SwarmInspector(swarm)  # type: ignore[arg-type]


def load_prompt_variants(settings: GatewaySettings, loaded: dict[str, LoadedModel]) -> dict[str, LoadedModel]:
    """``--prompts NAME=PATH`` -> {``MODEL:NAME``: the first model with those prompts}."""
    if not settings.prompts:
        return {}
    model = next(iter(loaded.values()))
    variants = {}
    for option in settings.prompts:
        name, path = parse_prompts_option(option)
        variant = prompt_variant(model, name, path)
        variants[public_id(variant)] = variant
        logger.info("serving tuned prompts %s from %s as %s", name, path, public_id(variant))
    return variants


def create_app(
    settings: GatewaySettings,
    *,
    swarm_factory: SwarmFactory | None = None,
    model_loader: ModelLoader = load_model,
    inspector_factory: InspectorFactory = connect_inspector,
) -> FastAPI:
    """Build the app; nothing starts until its lifespan runs (so exporting the OpenAPI schema is free)."""
    metrics = GatewayMetrics()
    secret = settings.swarm_secret.get_secret_value() if settings.swarm_secret else None
    if swarm_factory is None:
        swarm_factory = partial(
            connect_swarm,
            swarm_secret=secret,
            spot_check_probability=settings.spot_check_probability,
            push=settings.push,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            loaded: dict[str, LoadedModel] = {}
            for ref in settings.models:
                model = await asyncio.to_thread(model_loader, ref, settings)
                loaded[model.model_id] = model
            peers = list(settings.initial_peers)
            embedded: EmbeddedSwarm | None = None
            if not peers:
                embedded = EmbeddedSwarm(settings, list(loaded.values()))
                stack.push_async_callback(embedded.stop)
                peers = await embedded.start()
            swarm = await swarm_factory(peers)
            stack.push_async_callback(swarm.shutdown)
            if embedded is not None:
                await wait_until_served(swarm, list(loaded), settings.startup_timeout_s)
                print(ready_banner(settings, next(iter(loaded))), flush=True)
            blocks = {m.model_id: m.num_blocks for m in loaded.values()}
            app.state.swarm_view = SwarmView(inspector_factory(swarm), blocks, metrics)
            observed = ObservedSwarm(swarm, metrics)
            variants = await asyncio.to_thread(load_prompt_variants, settings, loaded)
            app.state.gateway = GatewayState(settings=settings, swarm=observed, models=loaded, prompt_variants=variants)
            logger.info("gateway ready: models %s, peers %s", ", ".join(loaded), " ".join(peers))
            yield
            logger.info("gateway shutting down")

    app = FastAPI(
        title="petals-next gateway",
        summary="OpenAI-compatible API over a swarm of block servers.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.api_key_digests = [key_digest(key) for key in settings.accepted_api_keys()]
    app.state.rate_limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
    install_error_handlers(app)
    for router in (chat.router, completions.router, models.router, health.router, monitoring.router):
        app.include_router(router)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
            expose_headers=["x-request-id", "retry-after"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: names every response, catches what is left
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """Validation errors answer 400 (``errors``), so drop FastAPI's automatic 422 from the schema."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default_openapi()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
