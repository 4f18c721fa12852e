"""The server-wide attention-cache budget, handed out in fixed-size pages, with waiting admission control.

A page is ``page_tokens`` tokens of one sequence across every hosted block (keys and values), so a session's
reservation is ``ceil(batch x capacity x its bytes per token / page bytes)`` pages, whatever its length
(``capacity``: its ``max_length``, rounded up to a power of two where its cache is pooled).

Layout choice: a session's cache is contiguous per row (its own tensor, or rows of a shared chunk of
``server.model.kv_pool``), and only the accounting is paged. A true page pool with per-session page tables would
make every attention call gather its pages first (torch has no paged-attention kernel on CPU). Measured with
``scripts/bench_kv_pages.py`` (SmolLM2 shapes, one thread, 16-token pages), gather + attend vs attend over a
contiguous slice at decode: 48 vs 26 us at 128 cached tokens, 158 vs 60 us at 512, 818 vs 265 us at 2048, i.e.
1.9x to 3.1x, per block per session per step. Pooled sessions are charged for their rounded-up capacity.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from swarm.errors import ServerBusyError


class PageAllocator:
    """Counts free pages; ``acquire`` waits (up to a timeout) for pages that closing sessions give back.

    Waiters are served in arrival order, so a large request is not starved by a stream of small ones. Runs on
    the event loop only (not thread-safe).
    """

    def __init__(self, total_pages: int, page_bytes: int):
        if page_bytes <= 0:
            raise ValueError("page_bytes must be positive")
        self.total_pages = max(0, total_pages)
        self.page_bytes = page_bytes
        self.free_pages = self.total_pages
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def pages_for(self, nbytes: int) -> int:
        return math.ceil(nbytes / self.page_bytes)

    @property
    def used_pages(self) -> int:
        return self.total_pages - self.free_pages

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self, pages: int) -> bool:
        """Take ``pages`` now if they are free and nobody waits ahead; never waits."""
        if self._waiters or pages > self.free_pages:
            return False
        self.free_pages -= pages
        return True

    async def acquire(self, pages: int, timeout_s: float) -> None:
        """Take ``pages``, waiting up to ``timeout_s`` for them; ServerBusyError (retryable) if they don't come."""
        if pages > self.total_pages:
            raise ServerBusyError(
                f"attention cache is full: {pages} pages asked, the whole cache has {self.total_pages}"
            )
        if self.try_acquire(pages):
            return
        if timeout_s <= 0:
            raise ServerBusyError(self._busy_message(pages))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pages, waiter)
        self._waiters.append(entry)
        began = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # granted just as the timeout fired: keep it
                return
            raise ServerBusyError(
                f"{self._busy_message(pages)}; waited {time.monotonic() - began:.1f}s for sessions to end"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(pages)  # granted, but our caller is gone
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._grant()  # we may have been blocking smaller requests behind us

    def release(self, pages: int) -> None:
        self.free_pages = min(self.total_pages, self.free_pages + pages)
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free_pages:
            pages, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.free_pages -= pages
            waiter.set_result(None)

    def _busy_message(self, pages: int) -> str:
        mib = self.page_bytes / 2**20
        return (
            f"attention cache is full: session needs {pages * mib:.1f} MiB, "
            f"{self.free_pages * mib:.1f} MiB of {self.total_pages * mib:.1f} MiB left"
        )
