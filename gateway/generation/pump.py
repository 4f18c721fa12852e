"""Run an async iterator in its own task, so a stream can fail with a real HTTP status before it starts.

The swarm session lives entirely inside the producer task (entered and exited there), which keeps any
task-bound state of the client (cancel scopes, timeouts) valid while the response streams from another task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()


class Pump(Generic[T]):
    """``await pump.start()`` waits for the first item (raising the producer's early error); then iterate."""

    def __init__(self, source: AsyncIterator[T]):
        self._source = source
        # Unbounded: the producer makes one item per swarm step, so the queue holds at most max_tokens items.
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._first: object = _END

    async def start(self) -> None:
        self._task = asyncio.create_task(self._produce())
        self._first = await self._next()

    async def _produce(self) -> None:
        try:
            async for item in self._source:
                self._queue.put_nowait(item)
        except Exception as e:  # handed to the consumer, which raises it in its own task
            self._queue.put_nowait(e)
            return
        self._queue.put_nowait(_END)

    async def _next(self) -> object:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def __aiter__(self) -> AsyncIterator[T]:
        item, self._first = self._first, _END
        while item is not _END:
            yield item  # type: ignore[misc]
            item = await self._next()

    async def aclose(self) -> None:
        """Cancel the producer (which closes its session) and wait for it to finish."""
        if self._task is None or self._task.done():
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


async def started_pump(source: AsyncIterator[T]) -> Pump[T]:
    """A Pump whose first item is ready; if starting fails or is cancelled, the producer is stopped."""
    pump: Pump[T] = Pump(source)
    try:
        await pump.start()
    except BaseException:
        await pump.aclose()
        raise
    return pump
