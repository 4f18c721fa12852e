"""GatewayState: the long-lived resources that the lifespan owns and the handlers share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.errors import ModelNotFoundError
from gateway.generation.model import LoadedModel
from gateway.generation.protocols import SwarmClientLike
from gateway.settings import GatewaySettings


@dataclass
class GatewayState:
    """Loaded models (by id and by reference) and the swarm client; nothing per request."""

    settings: GatewaySettings
    swarm: SwarmClientLike
    models: dict[str, LoadedModel]
    started_at: int = field(default_factory=lambda: int(time.time()))

    def model(self, name: str) -> LoadedModel:
        found = self.models.get(name)
        if found is None:
            for candidate in self.models.values():
                if candidate.ref == name:
                    return candidate
            raise ModelNotFoundError(f"The model {name!r} does not exist or is not served here.", param="model")
        return found
