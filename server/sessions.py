"""Inference sessions on one server: their attention caches, a paged memory budget, and admission control."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from server.kv_cache import PageAllocator
from server.model import SpanCache
from server.model.kv_pool import KVPool
from server.model.tuning import SpanTuning
from swarm.config import ModelSpec
from swarm.errors import ServerBusyError

logger = logging.getLogger(__name__)


CHUNKS_PER_BUDGET = 4
"""Pooled caches come in chunks of at most 1/4 of the budget. Sessions are charged for their own rows only, so
the free rows of partly filled chunks are memory beyond the budget: a new session takes free rows before a new
chunk is made, but after sessions leave several chunks of one capacity may be partly filled until they empty."""


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
    tuning: SpanTuning | None = None
    """Deep prompts / LoRA factors sent when the session opened, applied to each of its steps."""


@dataclass(frozen=True)
class SessionLimits:
    """Admission limits that keep one peer from taking a whole server (0 or 1.0: no limit)."""

    max_sessions: int = 0
    """Open (and opening) sessions on this server, all peers together."""
    max_sessions_per_peer: int = 0
    """Open (and opening) sessions of one peer."""
    max_cache_share: float = 1.0
    """Most of the cache (a fraction of its pages) one peer may hold while another peer waits for pages."""


class SessionRegistry:
    """Owns every open session's cache and keeps their total size within the budget, counted in pages.

    A page is ``page_tokens`` tokens of one sequence over all ``hosted_blocks``. A new session reserves the
    pages for its whole ``batch x max_length`` up front (so a running session never runs out mid-generation);
    when they are not free it waits up to ``alloc_timeout_s`` for closing sessions to give pages back, then is
    refused with the retryable ServerBusyError (clients route around it).

    ``limits`` refuse a session at once (also ServerBusyError) when the server or its peer already has too many
    sessions, or when its peer holds more than its fair share of the cache while another peer waits for pages.
    A peer alone on the server may use the whole cache: the share binds only when someone else is kept waiting.
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
        limits: SessionLimits | None = None,
    ):
        self.spec = spec
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.device = device
        self.alloc_timeout_s = alloc_timeout_s
        page_bytes = page_tokens * SpanCache.bytes_per_token(spec, hosted_blocks or spec.num_hidden_layers, dtype)
        self.allocator = PageAllocator(budget_bytes // page_bytes, page_bytes)
        self.pool = KVPool(spec, dtype, device, chunk_bytes=budget_bytes // CHUNKS_PER_BUDGET)
        self.sessions: dict[str, Session] = {}
        self.limits = limits or SessionLimits()
        self._pages_by_peer: Counter[str] = Counter()
        self._sessions_by_peer: Counter[str] = Counter()
        self._waiting_by_peer: Counter[str] = Counter()
        """Sessions of each peer still waiting for pages (they count against the session limits too)."""

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_pages * self.allocator.page_bytes

    def bytes_needed(self, num_blocks: int, batch_size: int, max_length: int) -> int:
        """What the session's cache takes: its rows at the capacity the pool gives it (see ``KVPool``)."""
        capacity, _ = self.pool.capacity_for(num_blocks, batch_size, max_length)
        return SpanCache.bytes_per_token(self.spec, num_blocks, self.dtype) * batch_size * capacity

    def tokens_left(self, num_blocks: int) -> int:
        per_token = SpanCache.bytes_per_token(self.spec, num_blocks, self.dtype)
        return self.allocator.free_pages * self.allocator.page_bytes // per_token

    async def open(
        self, session_id: str, peer_id: str, start: int, end: int, batch_size: int, max_length: int
    ) -> Session:
        pages = self.allocator.pages_for(self.bytes_needed(end - start, batch_size, max_length))
        self._admit(peer_id, pages)
        self._waiting_by_peer[peer_id] += 1
        try:
            await self.allocator.acquire(pages, self.alloc_timeout_s)
        finally:
            self._waiting_by_peer[peer_id] -= 1
            if not self._waiting_by_peer[peer_id]:
                del self._waiting_by_peer[peer_id]
        try:
            cache = self.pool.allocate(end - start, batch_size, max_length)
        except BaseException:
            self.allocator.release(pages)
            raise
        session = Session(session_id, peer_id, start, end, batch_size, max_length, cache, pages=pages)
        # Two streams may share a session id (a client retrying); keep them apart.
        key = session_id if session_id not in self.sessions else f"{session_id}#{id(session)}"
        self.sessions[key] = session
        session.session_id = key
        self._pages_by_peer[peer_id] += pages
        self._sessions_by_peer[peer_id] += 1
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
        self.pool.release(session.cache)
        self.allocator.release(session.pages)
        for counter, amount in ((self._pages_by_peer, session.pages), (self._sessions_by_peer, 1)):
            counter[session.peer_id] -= amount
            if counter[session.peer_id] <= 0:
                del counter[session.peer_id]
        logger.info("session %s %s after %d tokens", session.session_id[:8], reason, session.length)

    def _admit(self, peer_id: str, pages: int) -> None:
        """Refuse (retryable ServerBusyError, at once) a session over the limits; see the class docstring."""
        limits = self.limits
        opening = sum(self._waiting_by_peer.values())
        if limits.max_sessions and len(self.sessions) + opening >= limits.max_sessions:
            raise ServerBusyError(f"this server has {limits.max_sessions} sessions open, its limit")
        mine = self._sessions_by_peer[peer_id] + self._waiting_by_peer[peer_id]
        if limits.max_sessions_per_peer and mine >= limits.max_sessions_per_peer:
            raise ServerBusyError(
                f"peer {peer_id} has {mine} sessions open here, the limit per peer is {limits.max_sessions_per_peer}"
            )
        share = int(limits.max_cache_share * self.allocator.total_pages)
        held = self._pages_by_peer[peer_id]
        others_wait = any(peer != peer_id for peer in self._waiting_by_peer)
        if held + pages > share and others_wait:
            total = max(self.allocator.total_pages, 1)
            raise ServerBusyError(
                f"peer {peer_id} would hold {(held + pages) / total:.0%} of the attention cache while other peers "
                f"wait for it; a peer's fair share is {limits.max_cache_share:.0%}"
            )
