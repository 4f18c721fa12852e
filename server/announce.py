"""Heartbeat: re-announce the server's record in the DHT every few seconds until told to stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from hivemind.dht import DHT

from swarm.dht import announce
from swarm.records import ModelRecord, ServerRecord, ServerState

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        dht: DHT,
        peer_id: str,
        make_record: Callable[[ServerState], ServerRecord],
        model_record: ModelRecord,
        period_s: float,
    ):
        self.dht = dht
        self.peer_id = peer_id
        self.make_record = make_record
        self.model_record = model_record
        self.period_s = period_s
        self.state = ServerState.JOINING
        self._task: asyncio.Task | None = None

    async def announce_now(self, state: ServerState | None = None, expiration_s: float | None = None) -> None:
        if state is not None:
            self.state = state
        record = self.make_record(self.state)
        ok = await announce(self.dht, self.peer_id, record, self.model_record, expiration_s or self.period_s * 3)
        if not ok:
            logger.warning(
                "announcing %s blocks %d:%d as %s was not stored everywhere",
                record.model_id,
                record.start,
                record.end,
                record.state.value,
            )

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.announce_now()
            except Exception as e:  # the DHT may hiccup; the next heartbeat tries again
                logger.warning("heartbeat failed: %s", e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
