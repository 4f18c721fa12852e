"""Per-API-key rate limits: token buckets for requests and tokens per minute, held in memory.

A bucket holds up to one minute's allowance and refills continuously, so a key may burst up to its per-minute
limit and then runs at the steady rate. Tokens are counted as OpenAI counts them for its limits: when a request
arrives, its prompt tokens plus ``max_tokens`` for each choice, whatever it ends up generating.
Limits are per gateway process (several gateway replicas each allow the full rate).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import RateLimitError

MAX_TRACKED_KEYS = 100_000
"""Without API keys the limits apply per client address; forget the idlest buckets past this many."""


class TokenBucket:
    """``capacity`` units, refilled at ``capacity`` per minute."""

    def __init__(self, capacity: int, now: float):
        self.capacity = float(capacity)
        self.rate_per_s = capacity / 60.0
        self.level = float(capacity)
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s)
        self.updated = now

    def take(self, amount: float, now: float) -> float | None:
        """Take ``amount`` and return None, or take nothing and return the seconds until it would fit."""
        self._refill(now)
        if amount <= self.level:
            self.level -= amount
            return None
        return (amount - self.level) / self.rate_per_s


@dataclass
class _KeyBuckets:
    requests: TokenBucket | None
    tokens: TokenBucket | None


@dataclass
class RateLimiter:
    """Buckets per key; 0 turns a limit off."""

    rpm: int
    tpm: int
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, _KeyBuckets] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _buckets(self, key: str) -> _KeyBuckets:
        found = self._keys.get(key)
        if found is None:
            if len(self._keys) >= MAX_TRACKED_KEYS:
                idlest = min(self._keys, key=lambda k: _updated(self._keys[k]))
                del self._keys[idlest]
            now = self.clock()
            found = _KeyBuckets(
                TokenBucket(self.rpm, now) if self.rpm else None, TokenBucket(self.tpm, now) if self.tpm else None
            )
            self._keys[key] = found
        return found

    def charge_request(self, key: str) -> None:
        """Count one request against ``key``'s requests per minute; RateLimitError (429) if none is left."""
        bucket = self._buckets(key).requests
        if bucket is None:
            return
        wait = bucket.take(1, self.clock())
        if wait is not None:
            raise RateLimitError(
                f"Rate limit reached on requests per min (RPM): Limit {self.rpm}. Please try again in {wait:.1f}s.",
                kind="requests",
                retry_after_s=wait,
            )

    def charge_tokens(self, key: str, tokens: int) -> None:
        """Count ``tokens`` against ``key``'s tokens per minute; RateLimitError (429) if they do not fit."""
        bucket = self._buckets(key).tokens
        if bucket is None:
            return
        if tokens > self.tpm:
            raise RateLimitError(
                f"Request too large on tokens per min (TPM): Limit {self.tpm}, Requested {tokens}. "
                "Reduce the prompt or max_tokens.",
                kind="tokens",
                retry_after_s=None,  # waiting does not help
            )
        wait = bucket.take(tokens, self.clock())
        if wait is not None:
            raise RateLimitError(
                f"Rate limit reached on tokens per min (TPM): Limit {self.tpm}, Requested {tokens}. "
                f"Please try again in {wait:.1f}s.",
                kind="tokens",
                retry_after_s=wait,
            )


def _updated(buckets: _KeyBuckets) -> float:
    return max((b.updated for b in (buckets.requests, buckets.tokens) if b is not None), default=0.0)


@dataclass(frozen=True)
class Quota:
    """One request's handle on its key's token budget (handed to the services by the routers)."""

    limiter: RateLimiter
    key: str

    def charge_tokens(self, tokens: int) -> None:
        self.limiter.charge_tokens(self.key, tokens)
