"""GET /health: open (no API key); 200 while the gateway is up, with each model's coverage."""

from __future__ import annotations

from fastapi import APIRouter

from gateway.api.deps import StateDep
from gateway.schemas.models import HealthResponse
from gateway.services import models as service

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse)
async def health(state: StateDep) -> HealthResponse:
    return await service.health(state)
