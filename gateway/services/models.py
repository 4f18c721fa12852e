"""Which configured models (and their variants) the swarm serves completely right now (/v1/models, /health).

Variants are model ids ``MODEL:NAME``: tuned prompts the gateway holds (served whenever MODEL is), and LoRA adapters
that servers announce (served when the servers announcing the adapter cover every block)."""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import ModelNotFoundError
from gateway.generation.variants import public_id
from gateway.schemas.models import HealthResponse, ModelCard, ModelHealth, ModelList
from gateway.state import GatewayState
from swarm.records import ModelCoverage
from swarm.routing import missing_blocks

logger = logging.getLogger(__name__)

COVERAGE_TIMEOUT_S = 10.0


async def model_health(state: GatewayState) -> dict[str, ModelHealth]:
    """Coverage of every configured model, looked up concurrently; a failed lookup reads as incomplete."""
    ids = list(state.models)
    results = await asyncio.gather(*(_coverage(state, model_id) for model_id in ids))
    return dict(zip(ids, results, strict=True))


async def _coverage(state: GatewayState, model_id: str, adapters: list[str] | None = None) -> ModelHealth:
    """``adapters``, if given, is filled with the adapters whose announcing servers cover every block."""
    try:
        async with asyncio.timeout(COVERAGE_TIMEOUT_S):
            coverage = await state.swarm.model_coverage(model_id)
    except Exception as e:  # any failure means "not servable now"; the reason goes into the report
        logger.info("coverage of %s unavailable: %s", model_id, e)
        return ModelHealth(complete=False, error=f"{type(e).__name__}: {e}")
    if adapters is not None:
        adapters.extend(served_adapters(coverage))
    return ModelHealth(
        complete=coverage.complete,
        num_blocks=coverage.num_blocks,
        missing=list(coverage.missing),
        servers=len(coverage.servers),
    )


def served_adapters(coverage: ModelCoverage) -> list[str]:
    """Adapters announced by servers that together cover every block of the model."""
    announced = sorted({a for server in coverage.servers for a in server.record.adapters})
    return [a for a in announced if coverage.num_blocks > 0 and not missing_blocks(coverage, adapter=a)]


async def list_models(state: GatewayState) -> ModelList:
    ids = list(state.models)
    adapters: dict[str, list[str]] = {m: [] for m in ids}
    results = await asyncio.gather(*(_coverage(state, m, adapters[m]) for m in ids))
    served = [m for m, h in zip(ids, results, strict=True) if h.complete]
    names = list(served)
    names += [name for name, v in state.prompt_variants.items() if v.model_id in served]
    names += [f"{m}:{a}" for m in served for a in adapters[m]]
    return ModelList(data=[ModelCard(id=name, created=state.started_at) for name in names])


async def get_model(state: GatewayState, name: str) -> ModelCard:
    model = state.model(name)
    adapters: list[str] = []
    served = (await _coverage(state, model.model_id, adapters)).complete
    variant = model.variant
    if not served or (variant is not None and variant.adapter is not None and variant.adapter not in adapters):
        raise ModelNotFoundError(f"The model {name!r} is not fully served by the swarm right now.", param="model")
    return ModelCard(id=public_id(model), created=state.started_at)


async def health(state: GatewayState) -> HealthResponse:
    return HealthResponse(models=await model_health(state))
