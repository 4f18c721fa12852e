"""The client's side of an inference stream, read one request at a time while the handler waits on other things.

An ``anext`` on hivemind's request iterator must not be cancelled while the stream lives (that would close the
iterator), so a read that loses a race (to a pushed input) stays pending and is reused by the next read.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hivemind.proto import runtime_pb2

from swarm.errors import ServerLeavingError


class RequestReader:
    def __init__(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], leaving: asyncio.Event):
        self._requests = requests
        self._leaving = leaving
        self._pending: asyncio.Future[runtime_pb2.ExpertRequest] | None = None

    async def next(self, timeout_s: float, also: asyncio.Future | None = None) -> runtime_pb2.ExpertRequest | None:
        """The next request, or None once ``also`` is done first.

        Raises StopAsyncIteration when the client closed the stream, TimeoutError after ``timeout_s`` of silence,
        and ServerLeavingError once the server is leaving (leaving wins over a waiting request: the client
        replays that step on another server).
        """
        if self._leaving.is_set():
            self.cancel()
            raise ServerLeavingError("this server is leaving the swarm; continue on another server")
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._requests))
        receive = self._pending
        leaving = asyncio.ensure_future(self._leaving.wait())
        waits = {receive, leaving} | ({also} if also is not None else set())
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
        if self._leaving.is_set():
            self.cancel()
            raise ServerLeavingError("this server is leaving the swarm; continue on another server")
        if receive in done:
            self._pending = None
            return receive.result()
        if also is not None and also in done:
            return None
        self.cancel()
        raise TimeoutError

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
