"""GET /v1/models and GET /v1/models/{model_id}: the configured models that the swarm fully serves now."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.api.deps import StateDep, require_api_key
from gateway.api.responses import ERRORS
from gateway.schemas.models import ModelCard, ModelList
from gateway.services import models as service

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["models"], responses=ERRORS)


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: StateDep) -> ModelList:
    return await service.list_models(state)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, state: StateDep) -> ModelCard:
    return await service.get_model(state, model_id)
