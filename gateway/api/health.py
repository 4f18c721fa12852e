"""GET /health: open unless ``open_monitoring`` is off; 200 while the gateway is up, with each model's coverage."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.api.deps import StateDep, require_monitoring_access
from gateway.schemas.models import HealthResponse
from gateway.services import models as service

router = APIRouter(dependencies=[Depends(require_monitoring_access)], tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(state: StateDep) -> HealthResponse:
    return await service.health(state)
