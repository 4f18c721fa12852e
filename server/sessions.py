"""Inference sessions on one server: their attention caches, a memory budget, and admission control."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from server.model import SpanCache
from swarm.config import ModelSpec
from swarm.errors import ServerBusyError

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
    last_active: float = field(default_factory=time.monotonic)


class SessionRegistry:
    """Owns every open session's cache and keeps their total size within the budget."""

    def __init__(self, spec: ModelSpec, budget_bytes: int, dtype: torch.dtype, device: torch.device):
        self.spec = spec
        self.budget_bytes = budget_bytes
        self.dtype = dtype
        self.device = device
        self.used_bytes = 0
        self.sessions: dict[str, Session] = {}

    def bytes_needed(self, num_blocks: int, batch_size: int, max_length: int) -> int:
        return SpanCache.bytes_per_token(self.spec, num_blocks, self.dtype) * batch_size * max_length

    def tokens_left(self, num_blocks: int) -> int:
        per_token = SpanCache.bytes_per_token(self.spec, num_blocks, self.dtype)
        return max(0, (self.budget_bytes - self.used_bytes) // per_token)

    def open(self, session_id: str, peer_id: str, start: int, end: int, batch_size: int, max_length: int) -> Session:
        needed = self.bytes_needed(end - start, batch_size, max_length)
        if needed > self.budget_bytes - self.used_bytes:
            raise ServerBusyError(
                f"attention cache is full: session needs {needed / 2**20:.1f} MiB, "
                f"{(self.budget_bytes - self.used_bytes) / 2**20:.1f} MiB of {self.budget_bytes / 2**20:.1f} MiB left"
            )
        cache = SpanCache.allocate(self.spec, end - start, batch_size, max_length, self.dtype, self.device)
        self.used_bytes += cache.nbytes
        session = Session(session_id, peer_id, start, end, batch_size, max_length, cache)
        # Two streams may share a session id (a client retrying); keep them apart.
        key = session_id if session_id not in self.sessions else f"{session_id}#{id(session)}"
        self.sessions[key] = session
        session.session_id = key
        logger.info(
            "session %s opened by %s: blocks %d:%d, batch %d, max_length %d (%.1f MiB cache, %.1f MiB free)",
            key[:8],
            peer_id[-8:],
            start,
            end,
            batch_size,
            max_length,
            cache.nbytes / 2**20,
            (self.budget_bytes - self.used_bytes) / 2**20,
        )
        return session

    def close(self, session: Session, reason: str = "closed") -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        self.used_bytes -= session.cache.nbytes
        logger.info("session %s %s after %d tokens", session.session_id[:8], reason, session.length)
