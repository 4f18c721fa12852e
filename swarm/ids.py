"""Identifiers used across the swarm, and the grammar of DHT keys."""

from typing import NewType

ModelId = NewType("ModelId", str)
"""Name under which a model is announced, e.g. ``smollm2-135m-instruct``."""

SessionId = NewType("SessionId", str)
"""Client-chosen id of one inference session on one server span (a uuid4 hex string)."""

PeerIdStr = NewType("PeerIdStr", str)
"""A libp2p peer id in base58 form."""

MODEL_REGISTRY_KEY = "petals-next.models"
"""DHT key whose subkeys are model ids; values describe the model (number of blocks, ...)."""


def block_key(model_id: ModelId, block_index: int) -> str:
    """The DHT key under which servers hosting ``block_index`` of ``model_id`` announce themselves."""
    return f"{model_id}.block.{block_index}"
