"""GatewayState: the long-lived resources that the lifespan owns and the handlers share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.errors import ModelNotFoundError
from gateway.generation.model import LoadedModel
from gateway.generation.protocols import SwarmClientLike
from gateway.generation.variants import VARIANT_NAME, adapter_variant
from gateway.settings import GatewaySettings


@dataclass
class GatewayState:
    """Loaded models (by id and by reference), their prompt variants, and the swarm client; nothing per request."""

    settings: GatewaySettings
    swarm: SwarmClientLike
    models: dict[str, LoadedModel]
    started_at: int = field(default_factory=lambda: int(time.time()))
    prompt_variants: dict[str, LoadedModel] = field(default_factory=dict)
    """``MODEL:NAME`` -> the model with tuned prompts from ``--prompts`` (built at start-up)."""

    def model(self, name: str) -> LoadedModel:
        """The model (or variant) a request names: an id, a reference, ``MODEL:PROMPTS`` or ``MODEL:ADAPTER``.

        An adapter variant is not checked here: a session for it finds the servers announcing the adapter, or
        fails as not served (``services.models.get_model`` checks coverage for /v1/models/{id})."""
        found = self.models.get(name) or self.prompt_variants.get(name)
        if found is not None:
            return found
        for candidate in self.models.values():
            if candidate.ref == name:
                return candidate
        base, sep, suffix = name.rpartition(":")
        if sep and base in self.models and VARIANT_NAME.match(suffix):
            return adapter_variant(self.models[base], suffix)
        raise ModelNotFoundError(f"The model {name!r} does not exist or is not served here.", param="model")
