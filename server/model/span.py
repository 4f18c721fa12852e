"""A contiguous span of a model's decoder blocks, as one server hosts it, and its KV cache."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from server.model.attention import PackedKV
from server.model.kv_pool import SpanCache, chunk_order, decode_groups
from server.model.rotary import RotaryEmbedding
from server.model.tuning import PackedLora, SpanTuning
from swarm.config import ModelSpec
from swarm.weights import ResolvedModel, block_prefix, load_tensors

logger = logging.getLogger(__name__)


class BlockClass(Protocol):
    """What ``BLOCK_CLASSES`` holds: a decoder-layer class and the positional encoding its blocks share."""

    positional: Callable[[ModelSpec, torch.device | str | None], nn.Module]

    def __call__(
        self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> nn.Module: ...


BLOCK_CLASSES: dict[str, BlockClass] = {}
"""model_type -> decoder-layer class, filled in by ``server.model`` (imported before this module, always).

A class takes ``(spec, layer_idx, *, dtype, device)`` and has HF layer parameter names. Its class attribute
``positional`` is a module class built as ``positional(spec, device)`` whose forward
``(start, length, batch, dtype)`` returns the positional tensors of one span forward (rotary: ``(cos, sin)``,
each [B, S, Dh]; ALiBi: ``(bias [1, H, S, T],)``), computed once and shared by the span's blocks.
The block's forward is ``(hidden [B, S, D], *positional tensors, kv: KVSlot | None) -> [B, S, D]``.
A class whose attribute ``packs_sessions`` is true also takes ``kv: PackedKV`` with hidden [1, T, D] (several
sessions' tokens side by side, see ``BlockSpan.forward_packed``); the others get one forward per session.
"""


@dataclass
class SpanStep:
    """One session's share of a packed forward: its new tokens, its cache, and where they go."""

    hidden: torch.Tensor  # [B, S, D]
    cache: SpanCache
    start_position: int
    tuning: SpanTuning | None = None


class BlockSpan(nn.Module):
    """Blocks ``[start, end)`` of a model plus the positional encoding (rotary tables, ALiBi) they share.

    ``blocks[k]`` is model block ``start + k``; its state dict holds ``blocks.{k}.<HF layer names>``.
    """

    def __init__(
        self,
        spec: ModelSpec,
        start: int,
        end: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not 0 <= start < end <= spec.num_hidden_layers:
            raise ValueError(f"block span {start}:{end} is not inside 0:{spec.num_hidden_layers}")
        block_class = BLOCK_CLASSES.get(spec.model_type)
        if block_class is None:
            raise ValueError(f"no block implementation for model_type {spec.model_type!r}")
        self.spec = spec
        self.start = start
        self.end = end
        self.positions = block_class.positional(spec, device)
        self.blocks = nn.ModuleList(block_class(spec, i, dtype=dtype, device=device) for i in range(start, end))
        self.packs_sessions = bool(getattr(block_class, "packs_sessions", False)) and isinstance(
            self.positions, RotaryEmbedding
        )
        """Whether ``forward_packed`` runs several sessions as one forward (else one forward per session)."""
        self.pooled_decode = True
        """Whether packed decode steps of sessions whose caches share chunks (``server.model.kv_pool``) attend in
        one call per chunk; off, each session attends on its own (``scripts/profile_span.py`` compares them)."""
        self.lora_targets: tuple[str, ...] = tuple(getattr(block_class, "lora_targets", ()))
        """Linears of these blocks that take client-side LoRA (none for families without support)."""

    @classmethod
    def load(
        cls,
        resolved: ResolvedModel,
        start: int,
        end: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> BlockSpan:
        """Build the span, reading only its blocks' tensors, block by block (memory grows with the span)."""
        span = cls(resolved.spec, start, end, dtype=dtype, device=device)
        for k, block in enumerate(span.blocks):
            prefix = block_prefix(resolved.spec, start + k)
            tensors = load_tensors(resolved.folder, lambda name, p=prefix: name.startswith(p), dtype, device)
            block.load_state_dict({name[len(prefix) :]: t for name, t in tensors.items()}, strict=True)
        logger.info("loaded blocks %d:%d of %s (%s, %s)", start, end, resolved.model_id, dtype, device)
        return span

    def forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None = None,
        start_position: int = 0,
        blocks: slice | None = None,
        tuning: SpanTuning | None = None,
    ) -> torch.Tensor:
        """hidden: [B, S, D] at positions ``[start_position, start_position + S)`` -> [B, S, D].

        ``blocks`` picks a sub-range in absolute model block indices (``slice(3, 10)`` on a span hosting 0:15
        runs model blocks 3..9); ``None`` runs every hosted block. ``cache`` covers exactly the blocks that
        run, so a session over a sub-range allocates only what it uses. Nothing advances implicitly: the
        caller passes the next ``start_position`` itself. ``tuning`` (deep prompts, LoRA) has one row per block
        that runs, like ``cache``.
        """
        first, last = self._local_range(blocks)
        b, s, d = hidden.shape
        if d != self.spec.hidden_size:
            raise ValueError(f"hidden size {d} does not match the model's {self.spec.hidden_size}")
        if cache is not None:
            self._check_cache(cache, last - first, b, start_position + s)
        positional = self.positions(start_position, s, b, hidden.dtype)  # e.g. (cos, sin), each [B, S, Dh]
        for j, k in enumerate(range(first, last)):
            kv = cache.slot(j, start_position) if cache is not None else None
            if tuning is None:
                hidden = self.blocks[k](hidden, *positional, kv)
                continue
            hidden = tuning.add_prompts(j, hidden, start_position)
            lora = tuning.block_lora(j)
            hidden = self.blocks[k](hidden, *positional, kv, **({"lora": lora} if lora is not None else {}))
        return hidden

    def forward_packed(self, steps: Sequence[SpanStep], blocks: slice | None = None) -> list[torch.Tensor]:
        """Several sessions' steps over the same blocks -> their outputs, each [B_i, S_i, D].

        Their tokens are packed into one [1, T, D] forward (``T = sum B_i * S_i``) with per-token rotary
        positions, so the weight matmuls run once for all; attention stays per session (``PackedKV``). A lone
        step, or a family that cannot pack, takes the plain per-session ``forward``. Sessions with their own tuning
        (deep prompts, LoRA: client-sent or a server adapter) pack too, each with its own tensors.
        """
        tuned = [st.tuning for st in steps if st.tuning is not None]
        if len(steps) == 1 or not self.packs_sessions or (tuned and not self.lora_targets):
            return [self.forward(st.hidden, st.cache, st.start_position, blocks, st.tuning) for st in steps]
        order = sorted(range(len(steps)), key=lambda i: chunk_order(steps[i].cache))
        if order != list(range(len(steps))):  # sessions of one chunk side by side: one attention call per chunk
            outs = self.forward_packed([steps[i] for i in order], blocks)
            return [out for _, out in sorted(zip(order, outs, strict=True), key=lambda pair: pair[0])]
        first, last = self._local_range(blocks)
        d = self.spec.hidden_size
        device = steps[0].hidden.device
        batches, lengths = [st.hidden.shape[0] for st in steps], [st.hidden.shape[1] for st in steps]
        sizes = [b * s for b, s in zip(batches, lengths, strict=True)]
        for st in steps:
            if st.hidden.shape[2] != d:
                raise ValueError(f"hidden size {st.hidden.shape[2]} does not match the model's {d}")
            self._check_cache(st.cache, last - first, st.hidden.shape[0], st.start_position + st.hidden.shape[1])
        hidden = torch.cat([st.hidden.reshape(1, -1, d) for st in steps], dim=1)  # [1, T, D]
        caches, starts = [st.cache for st in steps], [st.start_position for st in steps]
        positions = torch.tensor(  # [1, T]: row-major per session, like the packed tokens
            [
                [
                    p
                    for p0, b, s in zip(starts, batches, lengths, strict=True)
                    for _ in range(b)
                    for p in range(p0, p0 + s)
                ]
            ],
            device=device,
        )
        assert isinstance(self.positions, RotaryEmbedding)  # packs_sessions implies it
        positional = self.positions.cos_sin(positions, hidden.dtype)  # (cos, sin), each [1, T, Dh]
        groups = None
        if self.pooled_decode and all(s == 1 for s in lengths) and all(st.cache.chunk is not None for st in steps):
            groups = decode_groups(caches, starts, device)
        for j, k in enumerate(range(first, last)):
            kv = PackedKV(caches, starts, batches, lengths, groups, j)
            if not tuned:
                hidden = self.blocks[k](hidden, *positional, kv)
                continue
            # Sessions with their own prompts / LoRA share the batch: prompts go to each session's rows, LoRA
            # deltas per segment of tokens (PackedLora); the base weights' matmuls still run once for all.
            hidden = self._add_packed_prompts(hidden, steps, j, batches, lengths, sizes)
            parts = [st.tuning.block_lora(j) if st.tuning is not None else None for st in steps]
            lora = PackedLora(parts, sizes) if any(p is not None for p in parts) else None
            hidden = self.blocks[k](hidden, *positional, kv, **({"lora": lora} if lora is not None else {}))
        parts_out = hidden[0].split(sizes)  # each [B_i * S_i, D]
        return [p.view(b, s, d) for p, b, s in zip(parts_out, batches, lengths, strict=True)]

    @staticmethod
    def _add_packed_prompts(
        hidden: torch.Tensor,
        steps: Sequence[SpanStep],
        j: int,
        batches: list[int],
        lengths: list[int],
        sizes: list[int],
    ) -> torch.Tensor:
        """hidden [1, T, D] of packed sessions: add block ``j``'s deep prompts of each session to its own rows."""
        if all(st.tuning is None or st.tuning.prompts is None for st in steps):
            return hidden
        d = hidden.shape[-1]
        pieces = hidden[0].split(sizes)  # each [B_i * S_i, D]
        out = []
        for st, piece, b, s in zip(steps, pieces, batches, lengths, strict=True):
            rows = piece.view(b, s, d)
            if st.tuning is not None:
                rows = st.tuning.add_prompts(j, rows, st.start_position)
            out.append(rows.reshape(b * s, d))
        return torch.cat(out).unsqueeze(0)

    def _local_range(self, blocks: slice | None) -> tuple[int, int]:
        if blocks is None:
            return 0, len(self.blocks)
        lo = self.start if blocks.start is None else blocks.start
        hi = self.end if blocks.stop is None else blocks.stop
        if blocks.step not in (None, 1) or not self.start <= lo < hi <= self.end:
            raise ValueError(f"blocks {lo}:{hi} are not a contiguous range inside the hosted {self.start}:{self.end}")
        return lo - self.start, hi - self.start

    @staticmethod
    def _check_cache(cache: SpanCache, num_blocks: int, batch_size: int, end_position: int) -> None:
        if cache.num_blocks != num_blocks:
            raise ValueError(f"cache covers {cache.num_blocks} blocks but this forward runs {num_blocks}")
        if cache.batch_size != batch_size:
            raise ValueError(f"cache holds {cache.batch_size} rows but the input has {batch_size}")
        if end_position > cache.capacity:
            raise ValueError(f"position {end_position} is past the cache capacity {cache.capacity}")
