"""Wire models of GET /v1/models and GET /health."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "petals-next"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelHealth(BaseModel):
    complete: bool
    num_blocks: int = 0
    missing: list[int] = Field(default_factory=list)
    servers: int = 0
    error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    models: dict[str, ModelHealth]
