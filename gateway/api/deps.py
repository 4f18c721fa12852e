"""Shared dependencies of the routers: the gateway state and API-key authentication."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import AuthenticationError
from gateway.state import GatewayState


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


StateDep = Annotated[GatewayState, Depends(get_state)]


def require_api_key(request: Request) -> None:
    """Accept ``Authorization: Bearer <key>`` when keys are configured (constant-time comparison)."""
    keys: list[str] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    presented = token.strip().encode()
    # Compare against every key (no early exit), so the timing does not tell which key was close.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise AuthenticationError("Incorrect API key provided.")


def require_monitoring_access(request: Request) -> None:
    """Health, metrics, dashboard and swarm views are open unless ``open_monitoring`` is off."""
    if not request.app.state.settings.open_monitoring:
        require_api_key(request)
