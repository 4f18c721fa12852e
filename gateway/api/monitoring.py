"""GET /v1/swarm (JSON), GET /metrics (Prometheus text) and GET /dashboard (the page that polls /v1/swarm).

All three follow the same access policy as /health (``open_monitoring``).
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.api.deps import require_monitoring_access
from gateway.metrics import GatewayMetrics
from gateway.schemas.common import ErrorResponse
from gateway.schemas.swarm import SwarmResponse
from gateway.services.swarm_view import SwarmView

logger = logging.getLogger(__name__)

router = APIRouter(
    dependencies=[Depends(require_monitoring_access)],
    tags=["monitoring"],
    responses={401: {"model": ErrorResponse, "description": "Missing or wrong API key (open_monitoring off)"}},
)


def _view(request: Request) -> SwarmView:
    return request.app.state.swarm_view


def _metrics(request: Request) -> GatewayMetrics:
    return request.app.state.metrics


@router.get("/v1/swarm", response_model=SwarmResponse)
async def swarm(request: Request) -> SwarmResponse:
    """Every model the swarm announces (coverage per block), every server (with a live probe), gateway stats."""
    return await _view(request).report()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this gateway, with the swarm's coverage refreshed from the (cached) snapshot."""
    await _view(request).snapshot()  # never raises: a failed lookup leaves the coverage gauges as they were
    return Response(_metrics(request).render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """A live page of the swarm's coverage and servers; plain HTML that polls /v1/swarm every 2 s."""
    page = resources.files("gateway").joinpath("static", "dashboard.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
