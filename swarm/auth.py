"""Private swarms: proofs of a shared swarm secret, for RPCs (client -> server) and DHT records (server -> all).

Every peer of a private swarm knows one secret. Nothing here encrypts (libp2p's secure channel already does, and
it authenticates both peer ids); the secret only decides who may use whom:

* An RPC carries ``RpcProof``: HMAC-SHA256(secret, "rpc", client peer id, server peer id, timestamp). The peer
  ids are the ones the transport authenticated, so a proof seen by one server cannot be replayed to another
  server or by another client, and the freshness window bounds how long a leaked proof is any good.
* A server signs its DHT record: HMAC-SHA256(secret, "record", peer id, canonical JSON of the record without
  ``auth``), carried in the record's tolerant ``auth`` field. Clients with the secret ignore records that do not
  verify, so they never route through a server outside the private swarm. The signature covers the raw wire dict
  (not a re-encoded model), so fields that a newer server adds and an older client does not know still verify.

Every comparison is constant-time (``hmac.compare_digest``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from swarm.errors import UnauthorizedError

FRESHNESS_S = 300.0
"""How far a proof's timestamp may be from the server's clock (either way): clock skew between machines."""


class RpcProof(BaseModel):
    """What a client of a private swarm puts in a request's metadata (``SpanRequest.auth``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    timestamp: float
    mac: str = Field(max_length=128, description="hex HMAC-SHA256 over the peer pair and the timestamp")


class SwarmSecret:
    """The shared secret of a private swarm, and the only code that touches it."""

    def __init__(self, secret: str, freshness_s: float = FRESHNESS_S):
        if not secret:
            raise ValueError("a swarm secret must not be empty")
        self._key = secret.encode()
        self.freshness_s = freshness_s

    def __repr__(self) -> str:
        return "SwarmSecret(***)"

    def _mac(self, *parts: str) -> str:
        # Parts are joined with a byte that no peer id, tag or JSON text contains, so they cannot be re-split.
        return hmac.new(self._key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()

    # --- RPCs -----------------------------------------------------------------------------------------------
    def prove(self, client_peer: str, server_peer: str, now: float | None = None) -> RpcProof:
        timestamp = time.time() if now is None else now
        return RpcProof(timestamp=timestamp, mac=self._mac("rpc", client_peer, server_peer, repr(timestamp)))

    def check(self, proof: RpcProof | None, client_peer: str, server_peer: str, now: float | None = None) -> None:
        """Raise ``UnauthorizedError`` (not retryable) unless ``proof`` is fresh and made with this secret."""
        if proof is None:
            raise UnauthorizedError("this server belongs to a private swarm: the request carries no swarm secret proof")
        now = time.time() if now is None else now
        expected = self._mac("rpc", client_peer, server_peer, repr(proof.timestamp))
        valid = hmac.compare_digest(expected.encode(), proof.mac.encode())
        if not valid:
            raise UnauthorizedError("this server belongs to a private swarm: the swarm secret proof is wrong")
        if abs(now - proof.timestamp) > self.freshness_s:
            raise UnauthorizedError(
                f"the swarm secret proof is {now - proof.timestamp:+.0f}s old (allowed: {self.freshness_s:.0f}s); "
                "check the clocks of client and server"
            )

    # --- DHT records ----------------------------------------------------------------------------------------
    def sign_record(self, wire: Mapping[str, Any], peer_id: str) -> str:
        return self._mac("record", peer_id, canonical_json(wire))

    def verify_record(self, wire: Any, peer_id: str) -> bool:
        if not isinstance(wire, Mapping) or not isinstance(wire.get("auth"), str):
            return False
        return hmac.compare_digest(self.sign_record(wire, peer_id).encode(), wire["auth"].encode())


def canonical_json(wire: Mapping[str, Any]) -> str:
    """The record as signed: every field but ``auth`` and ``None`` ones, sorted keys, no whitespace."""
    fields = {k: v for k, v in wire.items() if k != "auth" and v is not None}
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def swarm_secret(secret: str | None) -> SwarmSecret | None:
    """None (a public swarm) for no or an empty secret."""
    return SwarmSecret(secret) if secret else None
