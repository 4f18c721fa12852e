"""Which configured models the swarm serves completely right now (for /v1/models and /health)."""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import ModelNotFoundError
from gateway.schemas.models import HealthResponse, ModelCard, ModelHealth, ModelList
from gateway.state import GatewayState

logger = logging.getLogger(__name__)

COVERAGE_TIMEOUT_S = 10.0


async def model_health(state: GatewayState) -> dict[str, ModelHealth]:
    """Coverage of every configured model, looked up concurrently; a failed lookup reads as incomplete."""
    ids = list(state.models)
    results = await asyncio.gather(*(_coverage(state, model_id) for model_id in ids))
    return dict(zip(ids, results, strict=True))


async def _coverage(state: GatewayState, model_id: str) -> ModelHealth:
    try:
        async with asyncio.timeout(COVERAGE_TIMEOUT_S):
            coverage = await state.swarm.model_coverage(model_id)
    except Exception as e:  # any failure means "not servable now"; the reason goes into the report
        logger.info("coverage of %s unavailable: %s", model_id, e)
        return ModelHealth(complete=False, error=f"{type(e).__name__}: {e}")
    return ModelHealth(
        complete=coverage.complete,
        num_blocks=coverage.num_blocks,
        missing=list(coverage.missing),
        servers=len(coverage.servers),
    )


async def list_models(state: GatewayState) -> ModelList:
    health = await model_health(state)
    cards = [ModelCard(id=m, created=state.started_at) for m, h in health.items() if h.complete]
    return ModelList(data=cards)


async def get_model(state: GatewayState, name: str) -> ModelCard:
    model = state.model(name)
    if not (await _coverage(state, model.model_id)).complete:
        raise ModelNotFoundError(f"The model {name!r} is not fully served by the swarm right now.", param="model")
    return ModelCard(id=model.model_id, created=state.started_at)


async def health(state: GatewayState) -> HealthResponse:
    return HealthResponse(models=await model_health(state))
