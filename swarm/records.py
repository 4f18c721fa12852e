"""DHT records that servers announce, decoded tolerantly so that mixed versions can share a swarm."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

logger = logging.getLogger(__name__)


class ServerState(enum.StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


class ServerRecord(BaseModel):
    """What a server announces under the key of every block it hosts. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model_id: str
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    state: ServerState
    throughput: float = Field(default=1.0, ge=0, description="measured blocks-forward/s for one token step")
    cache_tokens_left: int = Field(default=0, ge=0)
    protocol_version: int = 1
    version: str = ""
    public_name: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    adapters: list[str] = Field(default_factory=list)
    """Names of the LoRA adapters this server applies on request (``--adapters``); older servers announce none."""
    push: bool = False
    """Understands pushed steps (server-to-server push); older servers lack the field and are never asked to."""
    auth: str | None = None
    """Private swarms: the server's HMAC of this record under the swarm secret (``swarm.auth``)."""
    public_key: str | None = None
    """The server's identity key (base64 DER); its hash is the peer id the record is announced under."""
    signed_at: float | None = None
    signature: str | None = None
    """RSA-PSS signature by ``public_key`` over the record and the peer id (``swarm.identity``)."""

    @field_validator("adapters", mode="before")
    @classmethod
    def _tolerate_adapters(cls, value: Any) -> list[str]:
        """A garbled adapter list costs only the adapters, not the whole record."""
        return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, value: Any) -> ServerRecord | None:
        """Decode a record; return None (and log) for garbage instead of raising."""
        try:
            record = cls.model_validate(value)
        except ValidationError as e:
            logger.debug("ignoring malformed server record: %s", e)
            return None
        if record.end <= record.start:
            return None
        return record


class ModelRecord(BaseModel):
    """What a server announces about the model itself, under ``ids.MODEL_REGISTRY_KEY``."""

    model_config = ConfigDict(extra="ignore")

    num_blocks: int = Field(gt=0)
    hidden_size: int = Field(gt=0)


@dataclass(frozen=True)
class RemoteServer:
    """A server seen in the DHT."""

    peer_id: str
    record: ServerRecord

    @property
    def start(self) -> int:
        return self.record.start

    @property
    def end(self) -> int:
        return self.record.end


@dataclass
class ModelCoverage:
    """How completely the swarm serves one model right now."""

    model_id: str
    num_blocks: int
    servers: list[RemoteServer] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.num_blocks > 0 and not self.missing
