"""Announce and look up swarm records in a hivemind DHT.

Functions passed to ``DHT.run_coroutine`` execute inside the DHT's own process, so they are module-level
(picklable) and return plain data; decoding into records happens here, in the caller's process.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from hivemind.dht import DHT, DHTNode
from hivemind.utils import get_dht_time

from swarm.auth import SwarmSecret
from swarm.identity import verify_record
from swarm.ids import MODEL_REGISTRY_KEY, ModelId, block_key
from swarm.records import ModelCoverage, ModelRecord, RemoteServer, ServerRecord


async def announce(
    dht: DHT,
    peer_id: str,
    record: ServerRecord,
    model_record: ModelRecord,
    expiration_s: float,
) -> bool:
    """Store ``record`` under every hosted block's key (subkey: our peer id), and the model's own record."""
    keys = [block_key(ModelId(record.model_id), i) for i in range(record.start, record.end)]
    values: list[Any] = [record.to_wire()] * len(keys)
    subkeys = [peer_id] * len(keys)
    keys.append(MODEL_REGISTRY_KEY)
    values.append(model_record.model_dump(mode="json"))
    subkeys.append(record.model_id)
    expiration = get_dht_time() + expiration_s
    results = await _await(dht, partial(_store_many, keys, values, subkeys, expiration))
    return all(results.values())


async def fetch_coverage(
    dht: DHT, model_id: str, num_blocks: int | None = None, secret: SwarmSecret | None = None
) -> ModelCoverage:
    """Read who serves which blocks of ``model_id``; ``num_blocks`` is looked up in the registry if not given.

    With a private swarm's ``secret``, records that its servers did not sign are left out (as if absent).
    """
    if num_blocks is None:
        models = await fetch_models(dht)
        if model_id not in models:
            return ModelCoverage(model_id=model_id, num_blocks=0)
        num_blocks = models[model_id].num_blocks
    keys = [block_key(ModelId(model_id), i) for i in range(num_blocks)]
    raw = await _await(dht, partial(_get_many, keys))
    servers = newest_records(raw, model_id, num_blocks, secret)
    covered = [False] * num_blocks
    for server in servers.values():
        if server.record.state.value == "online":
            for i in range(server.start, server.end):
                covered[i] = True
    missing = [i for i, ok in enumerate(covered) if not ok]
    return ModelCoverage(model_id=model_id, num_blocks=num_blocks, servers=list(servers.values()), missing=missing)


def newest_records(
    raw: dict[str, dict[str, tuple[Any, float]]], model_id: str, num_blocks: int, secret: SwarmSecret | None = None
) -> dict[str, RemoteServer]:
    """Each peer's most recently signed valid record among ``raw`` ({block key: {peer id: (value, expiration)}}).

    A record counts only if the peer it is stored under signed it (``swarm.identity``): records announced on
    another peer's behalf, or replayed from the past over a newer one, are ignored. A server that moved leaves
    (offline) records under its old blocks, hence the newest record per peer.
    """
    newest: dict[str, tuple[tuple[float, float], ServerRecord]] = {}
    for peers in raw.values():
        for peer_id, (value, expiration) in (peers or {}).items():
            if not verify_record(value, peer_id):
                continue
            if secret is not None and not secret.verify_record(value, peer_id):
                continue
            record = ServerRecord.from_wire(value)
            if record is None or record.model_id != model_id or record.end > num_blocks:
                continue
            order = (record.signed_at or 0.0, expiration)
            if peer_id not in newest or order > newest[peer_id][0]:
                newest[peer_id] = (order, record)
    return {peer_id: RemoteServer(peer_id=peer_id, record=record) for peer_id, (_, record) in newest.items()}


async def fetch_models(dht: DHT) -> dict[str, ModelRecord]:
    raw = await _await(dht, partial(_get_many, [MODEL_REGISTRY_KEY]))
    models: dict[str, ModelRecord] = {}
    for model_id, (value, _) in (raw.get(MODEL_REGISTRY_KEY) or {}).items():
        try:
            models[model_id] = ModelRecord.model_validate(value)
        except ValueError:
            continue
    return models


async def _await(dht: DHT, coro) -> Any:
    return await asyncio.wrap_future(dht.run_coroutine(coro, return_future=True))


async def _store_many(keys, values, subkeys, expiration, _dht: DHT, node: DHTNode) -> dict[str, bool]:
    return await node.store_many(keys, values, expiration, subkeys=subkeys)


async def _get_many(keys, _dht: DHT, node: DHTNode) -> dict[str, dict[str, tuple[Any, float]]]:
    """Latest values of dictionary keys as {key: {subkey: (value, expiration time)}}."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    result: dict[str, dict[str, tuple[Any, float]]] = {}
    for key, item in found.items():
        if item is None or not isinstance(item.value, dict):
            continue
        result[key] = {
            str(sub): (v.value, v.expiration_time) for sub, v in item.value.items() if hasattr(v, "expiration_time")
        }
    return result
