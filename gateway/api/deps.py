"""Shared dependencies of the routers: the gateway state, API-key authentication and per-key rate limits."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from gateway.errors import AuthenticationError
from gateway.limits import Quota, RateLimiter
from gateway.state import GatewayState


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway


StateDep = Annotated[GatewayState, Depends(get_state)]


def key_digest(key: str) -> bytes:
    """Keys are compared (and rate-limited) by their SHA-256, so every comparison has the same length."""
    return hashlib.sha256(key.encode()).digest()


def require_api_key(request: Request) -> str:
    """Accept ``Authorization: Bearer <key>`` when keys are configured (constant-time comparison).

    Returns who is calling, for rate limits: the key's digest, or the client address when auth is off.
    """
    digests: list[bytes] = request.app.state.api_key_digests
    if not digests:
        return f"client:{request.client.host if request.client else '-'}"
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    presented = key_digest(token.strip())
    # Compare against every key (no early exit), so the timing does not tell which key was close.
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(presented, digest)
    if not matched:
        raise AuthenticationError("Incorrect API key provided.")
    return f"key:{presented.hex()}"


def charge_request(request: Request, caller: Annotated[str, Depends(require_api_key)]) -> Quota:
    """Count the request against its caller's requests per minute (429 when used up); returns the caller's
    token budget, which the service charges once it knows the prompt length and max_tokens."""
    limiter: RateLimiter = request.app.state.rate_limiter
    limiter.charge_request(caller)
    return Quota(limiter, caller)


QuotaDep = Annotated[Quota, Depends(charge_request)]


def require_monitoring_access(request: Request) -> None:
    """Health, metrics, dashboard and swarm views are open unless ``open_monitoring`` is off."""
    if not request.app.state.settings.open_monitoring:
        require_api_key(request)
