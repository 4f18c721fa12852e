"""Session attention caches (``SpanCache``), carved out of shared chunks so concurrent decode steps attend together.

A chunk is one keys and one values tensor ``[num_blocks, rows, H_kv, capacity, Dh]``; a session of batch B owns
B consecutive rows of a chunk, and its ``SpanCache`` is a view of them, so every per-session code path (prefill,
tuning, the plain forward) works on it unchanged. What the chunk adds is the decode fast path
(``attend_pooled``): when several sessions of one chunk each bring one new token, every block writes all their
keys and values with one indexed store and runs one attention call over the chunk's rows, instead of a dozen
small operations per session per block. On a GPU those per-session launches, not the math, bounded a
16-session decode step (``scripts/profile_span.py``).

Capacities are rounded up to a power of two (at least ``MIN_CAPACITY``) so that sessions of similar lengths share
chunks; a session whose rounded rows would not leave room for a second session in a chunk gets an exact,
unshared cache instead (no batching gain is possible for it, so no memory is spent on rounding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.model.attention import KVSlot
from swarm.config import ModelSpec

MIN_CAPACITY = 16
"""Smallest pooled capacity in tokens: a session asking for fewer still gets this many."""
MAX_ROWS = 32
"""Most rows in one chunk."""


class SpanCache:
    """Preallocated keys and values for a run of consecutive blocks: ``[num_blocks, B, H_kv, capacity, Dh]``.

    ``H_kv`` is ``spec.num_key_value_heads``: the kv heads a block caches (all heads for BLOOM).

    Slot ``j`` belongs to the ``j``-th block that a forward runs (see ``BlockSpan.forward``). Positions
    are token positions: a forward at ``start_position`` writes there and attends over
    ``[0, start_position + S)``.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, chunk: CacheChunk | None = None, row: int = 0):
        self.keys = keys  # [N, B, H_kv, capacity, Dh]
        self.values = values  # [N, B, H_kv, capacity, Dh]
        self.chunk = chunk
        """The shared chunk these are rows ``row ..`` of (see ``KVPool``); None: the cache's own tensors."""
        self.row = row

    @classmethod
    def allocate(
        cls,
        spec: ModelSpec,
        num_blocks: int,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> SpanCache:
        shape = (num_blocks, batch_size, spec.num_key_value_heads, capacity, spec.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_token(spec: ModelSpec, num_blocks: int, dtype: torch.dtype) -> int:
        """Cache bytes one token of one sequence takes across ``num_blocks`` blocks (keys and values)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_blocks * spec.num_key_value_heads * spec.head_dim * itemsize

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def slot(self, j: int, start: int) -> KVSlot:
        return KVSlot(key=self.keys[j], value=self.values[j], start=start)


@dataclass(eq=False)
class CacheChunk:
    keys: torch.Tensor  # [N, R, H_kv, capacity, Dh]
    values: torch.Tensor
    free: list[bool] = field(default_factory=list)
    """Whether each row is free."""

    @property
    def empty(self) -> bool:
        return all(self.free)

    def take(self, batch_size: int) -> int | None:
        """The first row of ``batch_size`` consecutive free rows, now taken; None if there is no such run."""
        run = 0
        for row, free in enumerate(self.free):
            run = run + 1 if free else 0
            if run == batch_size:
                first = row - batch_size + 1
                self.free[first : row + 1] = [False] * batch_size
                return first
        return None


class KVPool:
    """Hands out session caches as row ranges of shared chunks (see the module docstring).

    Chunks are made on demand, one set per (blocks, capacity), sized to at most ``chunk_bytes``, and freed as soon
    as their last session leaves. Not thread-safe: the event loop allocates and releases.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str, chunk_bytes: int):
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk_bytes = chunk_bytes
        self.chunks: dict[tuple[int, int], list[CacheChunk]] = {}

    def row_bytes(self, num_blocks: int, capacity: int) -> int:
        """Bytes of one chunk row (keys and values) over ``num_blocks`` blocks at ``capacity`` tokens."""
        return SpanCache.bytes_per_token(self.spec, num_blocks, self.dtype) * capacity

    def rows_per_chunk(self, num_blocks: int, capacity: int) -> int:
        return max(1, min(MAX_ROWS, self.chunk_bytes // self.row_bytes(num_blocks, capacity)))

    def capacity_for(self, num_blocks: int, batch_size: int, max_length: int) -> tuple[int, bool]:
        """The cache capacity a session gets, and whether it is pooled (else exactly ``max_length``)."""
        capacity = max(MIN_CAPACITY, 1 << (max_length - 1).bit_length())
        if self.rows_per_chunk(num_blocks, capacity) < 2 * batch_size:
            return max_length, False
        return capacity, True

    def allocate(self, num_blocks: int, batch_size: int, max_length: int) -> SpanCache:
        """A ``SpanCache`` for the session: rows of a chunk where ``capacity_for`` says pooled, else its own."""
        capacity, pooled = self.capacity_for(num_blocks, batch_size, max_length)
        if not pooled:
            return SpanCache.allocate(self.spec, num_blocks, batch_size, capacity, self.dtype, self.device)
        chunks = self.chunks.setdefault((num_blocks, capacity), [])
        for chunk in chunks:
            row = chunk.take(batch_size)
            if row is not None:
                break
        else:
            chunk = self._new_chunk(num_blocks, capacity)
            chunks.append(chunk)
            row = chunk.take(batch_size)
            assert row is not None
        rows = slice(row, row + batch_size)
        # Rows come back dirty from earlier sessions; masked positions must hold finite numbers (0 x NaN is NaN).
        chunk.keys[:, rows].zero_()
        chunk.values[:, rows].zero_()
        return SpanCache(chunk.keys[:, rows], chunk.values[:, rows], chunk=chunk, row=row)

    def _new_chunk(self, num_blocks: int, capacity: int) -> CacheChunk:
        rows = self.rows_per_chunk(num_blocks, capacity)
        shape = (num_blocks, rows, self.spec.num_key_value_heads, capacity, self.spec.head_dim)
        # Not zeroed: ``allocate`` clears each session's rows as it hands them out (a whole chunk is up to a quarter
        # of the budget; zeroing it all when a lone session arrived added about 0.3 s to its first token on a CPU).
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        return CacheChunk(keys, values, [True] * rows)

    def release(self, cache: SpanCache) -> None:
        """Give the session's rows back. A step of that session already running on the compute thread may still
        write them once; that is harmless, since a new owner writes every position before attending over it."""
        chunk = cache.chunk
        if chunk is None:
            return
        chunk.free[cache.row : cache.row + cache.batch_size] = [True] * cache.batch_size
        if chunk.empty:
            key = (cache.num_blocks, cache.capacity)
            self.chunks[key] = [c for c in self.chunks.get(key, []) if c is not chunk]
            if not self.chunks[key]:
                del self.chunks[key]

    @property
    def allocated_bytes(self) -> int:
        return sum(c.keys.nbytes + c.values.nbytes for chunks in self.chunks.values() for c in chunks)


@dataclass(eq=False)
class DecodeGroup:
    """Decode tokens of one forward that lie side by side and whose sessions share a chunk: where they go and what
    each row sees."""

    chunk: CacheChunk
    tokens: slice
    """The group's tokens among the forward's packed tokens."""
    rows: torch.Tensor  # long [t]: each token's chunk row
    positions: torch.Tensor  # long [t]: each token's position
    mask: torch.Tensor  # bool [t, 1, 1, longest]: which cached positions each token's query sees
    row_range: slice | None
    """The rows as one ascending run (a slice of the chunk), so attention reads them without a gather; None: the
    rows are scattered and get gathered."""


def chunk_order(cache: SpanCache) -> tuple[int, int]:
    """A sort key that puts sessions of one chunk side by side, in row order (unpooled caches first)."""
    return (0, 0) if cache.chunk is None else (id(cache.chunk), cache.row)


def decode_groups(caches: list[SpanCache], starts: list[int], device: torch.device) -> list[DecodeGroup]:
    """One-token-per-row steps of pooled sessions (caches[i] has its rows at position starts[i]), grouped into
    runs of consecutive sessions that share a chunk (``chunk_order`` makes that one run per chunk)."""
    runs: list[tuple[CacheChunk, int, list[int], list[int]]] = []
    token = 0
    for cache, start in zip(caches, starts, strict=True):
        if not runs or runs[-1][0] is not cache.chunk:
            runs.append((cache.chunk, token, [], []))
        _, _, rows, positions = runs[-1]
        rows += range(cache.row, cache.row + cache.batch_size)
        positions += [start] * cache.batch_size
        token += cache.batch_size
    groups = []
    for chunk, first, rows, positions in runs:
        ends = torch.tensor(positions) + 1
        mask = (torch.arange(int(ends.max()))[None, :] < ends[:, None])[:, None, None, :]
        consecutive = rows == list(range(rows[0], rows[-1] + 1))
        groups.append(
            DecodeGroup(
                chunk=chunk,
                tokens=slice(first, first + len(rows)),
                rows=torch.tensor(rows, device=device),
                positions=torch.tensor(positions, device=device),
                mask=mask.to(device),
                row_range=slice(rows[0], rows[-1] + 1) if consecutive else None,
            )
        )
    return groups


def attend_pooled(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: list[DecodeGroup], block: int, scale: float | None
) -> torch.Tensor:
    """Packed decode tokens of pooled sessions, block ``block`` of their chunks: q [1, H, T, Dh], k/v
    [1, H_kv, T, Dh] -> [1, H, T, Dh]. Each group stores its tokens' keys/values and attends in one call.
    Plain causal attention only (no sliding window, soft-capping or bias); the callers check."""
    queries, keys, values = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, H or H_kv, Dh]
    outs = [_attend_group(g, block, queries[g.tokens], keys[g.tokens], values[g.tokens], scale) for g in groups]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [T, H, Dh]
    return out.transpose(0, 1).unsqueeze(0)


def _attend_group(
    g: DecodeGroup, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """q [t, H, Dh], k/v [t, H_kv, Dh] -> [t, H, Dh]."""
    chunk_keys, chunk_values = g.chunk.keys[block], g.chunk.values[block]  # [R, H_kv, capacity, Dh]
    chunk_keys[g.rows, :, g.positions] = k
    chunk_values[g.rows, :, g.positions] = v
    longest = g.mask.shape[-1]
    if g.row_range is not None:
        cached_k, cached_v = chunk_keys[g.row_range, :, :longest], chunk_values[g.row_range, :, :longest]
    else:
        cached_k, cached_v = chunk_keys[g.rows, :, :longest], chunk_values[g.rows, :, :longest]  # gathered
    # Each kv head's query heads go as that head's query rows ([t, H_kv, H / H_kv, Dh]; they share the row's mask):
    # grouped-query attention without ``enable_gqa``, which on CUDA left only SDPA's slow math kernel with a mask.
    t, h, dh = q.shape
    grouped = q.reshape(t, k.shape[1], h // k.shape[1], dh)
    out = F.scaled_dot_product_attention(grouped, cached_k, cached_v, attn_mask=g.mask, scale=scale)
    return out.reshape(t, h, dh)
