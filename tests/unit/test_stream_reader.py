"""RequestReader: a read that loses a race to another event stays pending and is not lost."""

from __future__ import annotations

import asyncio

import pytest

from server.stream_reader import RequestReader
from swarm.errors import ServerLeavingError


async def test_a_read_that_loses_the_race_is_kept_for_the_next_call():
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def requests():
        while True:
            yield await queue.get()

    reader = RequestReader(requests(), asyncio.Event())
    pushed = asyncio.get_running_loop().create_future()
    pushed.set_result("pushed")
    assert await reader.next(1.0, also=pushed) is None
    queue.put_nowait("first")
    assert await reader.next(1.0) == "first"
    queue.put_nowait("second")
    assert await reader.next(1.0, also=asyncio.get_running_loop().create_future()) == "second"
    with pytest.raises(TimeoutError):
        await reader.next(0.05)


async def test_leaving_and_the_end_of_the_stream():
    async def two():
        yield "only"

    leaving = asyncio.Event()
    reader = RequestReader(two(), leaving)
    assert await reader.next(1.0) == "only"
    with pytest.raises(StopAsyncIteration):
        await reader.next(1.0)
    leaving.set()
    with pytest.raises(ServerLeavingError):
        await reader.next(1.0)
