"""Inference sessions on one server: their attention caches, a paged memory budget, and admission control."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from server.kv_cache import PageAllocator
from server.model import SpanCache
from swarm.config import ModelSpec

logger = logging.getLogger(__name__)


@dataclass
class Session:
    session_id: str
    peer_id: str
    start: int
    """First block (absolute index) this session runs."""
    end: int
    batch_size: int
    max_length: int
    cache: SpanCache
    length: int = 0
    """Tokens whose keys and values are in the cache."""
    pages: int = 0
    """Cache pages reserved for this session (given back on close)."""
    last_active: float = field(default_factory=time.monotonic)


class SessionRegistry:
    """Owns every open session's cache and keeps their total size within the budget, counted in pages.

    A page is ``page_tokens`` tokens of one sequence over all ``hosted_blocks``. A new session reserves the
    pages for its whole ``batch x max_length`` up front (so a running session never runs out mid-generation);
    when they are not free it waits up to ``alloc_timeout_s`` for closing sessions to give pages back, then is
    refused with the retryable ServerBusyError (clients route around it).
    """

    def __init__(
        self,
        spec: ModelSpec,
        budget_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        hosted_blocks: int | None = None,
        page_tokens: int = 16,
        alloc_timeout_s: float = 0.0,
    ):
        self.spec = spec
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.device = device
        self.alloc_timeout_s = alloc_timeout_s
        page_bytes = page_tokens * SpanCache.bytes_per_token(spec, hosted_blocks or spec.num_hidden_layers, dtype)
        self.allocator = PageAllocator(budget_bytes // page_bytes, page_bytes)
        self.sessions: dict[str, Session] = {}

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_pages * self.allocator.page_bytes

    def bytes_needed(self, num_blocks: int, batch_size: int, max_length: int) -> int:
        return SpanCache.bytes_per_token(self.spec, num_blocks, self.dtype) * batch_size * max_length

    def tokens_left(self, num_blocks: int) -> int:
        per_token = SpanCache.bytes_per_token(self.spec, num_blocks, self.dtype)
        return self.allocator.free_pages * self.allocator.page_bytes // per_token

    async def open(
        self, session_id: str, peer_id: str, start: int, end: int, batch_size: int, max_length: int
    ) -> Session:
        pages = self.allocator.pages_for(self.bytes_needed(end - start, batch_size, max_length))
        await self.allocator.acquire(pages, self.alloc_timeout_s)
        try:
            cache = SpanCache.allocate(self.spec, end - start, batch_size, max_length, self.dtype, self.device)
        except BaseException:
            self.allocator.release(pages)
            raise
        session = Session(session_id, peer_id, start, end, batch_size, max_length, cache, pages=pages)
        # Two streams may share a session id (a client retrying); keep them apart.
        key = session_id if session_id not in self.sessions else f"{session_id}#{id(session)}"
        self.sessions[key] = session
        session.session_id = key
        logger.info(
            "session %s opened by %s: blocks %d:%d, batch %d, max_length %d (%d pages, %.1f MiB free)",
            key[:8],
            peer_id[-8:],
            start,
            end,
            batch_size,
            max_length,
            pages,
            self.allocator.free_pages * self.allocator.page_bytes / 2**20,
        )
        return session

    def close(self, session: Session, reason: str = "closed") -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        self.allocator.release(session.pages)
        logger.info("session %s %s after %d tokens", session.session_id[:8], reason, session.length)
