"""Causal self-attention pieces every family shares: the KV cache slot, masks, and the attention itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from server.model.rotary import rotate

if TYPE_CHECKING:
    from server.model.kv_pool import DecodeGroup, SpanCache


@dataclass
class KVSlot:
    """One block's share of a KV cache, and where this forward's new tokens go.

    ``start`` is one position shared by every row. Batching decode steps of sessions with different lengths
    later means: ``start`` becomes a LongTensor [B], the write below becomes a per-row scatter, and
    ``attention_mask`` gets per-row query positions (it already reasons in positions, not in shapes).
    """

    key: torch.Tensor  # [B, H_kv, capacity, Dh]
    value: torch.Tensor  # [B, H_kv, capacity, Dh]
    start: int


@dataclass
class PackedKV:
    """Several sessions' steps packed into one forward: their tokens lie side by side on the sequence axis.

    Session ``i`` contributes ``batch_i * length_i`` tokens (row-major: row 0's tokens, then row 1's, ...) at
    positions ``[starts_i, starts_i + length_i)``. The projections, norms and MLP run once on all tokens
    ([1, T, D]); attention runs per session over that session's own cache (``slots[i]``), so no session sees
    another's keys, or, for decode steps of pooled caches, one call per chunk (``groups``).
    """

    caches: list[SpanCache]
    starts: list[int]
    batches: list[int]
    lengths: list[int]
    groups: list[DecodeGroup] | None = None
    """When every session brings one token per row (decoding) and their caches are pooled: the tokens grouped by
    the chunk their caches share, so ``attend_pooled`` runs one attention call per chunk. The same for every
    block of a forward, so ``BlockSpan.forward_packed`` builds them once."""
    block: int = 0
    """Which block of the sessions' caches (and chunks) this forward's block is."""

    @property
    def slots(self) -> list[KVSlot]:
        """Each session's share of this block's cache (built on demand: the pooled path never needs them)."""
        return [cache.slot(self.block, start) for cache, start in zip(self.caches, self.starts, strict=True)]

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: [1, H, T, Dh] -> per session [B_i, H, S_i, Dh] (views where possible)."""
        parts = x[0].split([b * s for b, s in zip(self.batches, self.lengths, strict=True)], dim=1)  # [H, B_i*S_i, Dh]
        return [
            p.unflatten(1, (b, s)).transpose(0, 1)  # [B_i, H, S_i, Dh]
            for p, b, s in zip(parts, self.batches, self.lengths, strict=True)
        ]

    @staticmethod
    def join(parts: list[torch.Tensor]) -> torch.Tensor:
        """Per session [B_i, H, S_i, Dh] -> [1, H, T, Dh], the inverse of ``split``."""
        return torch.cat([p.transpose(0, 1).flatten(1, 2) for p in parts], dim=1).unsqueeze(0)


def attention_mask(
    start: int, length: int, sliding_window: int | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Which keys each new query sees, as ``(bool mask [length, start + length] or None, is_causal)``.

    The query at position ``start + i`` sees key ``j`` iff ``j <= start + i`` and, with a sliding window,
    ``j > start + i - window`` (transformers' convention). The common cases need no mask tensor at all.
    """
    total = start + length
    clipped = sliding_window is not None and total > sliding_window
    if not clipped and length == 1:
        return None, False  # one new token sees everything cached: the decode fast path
    if not clipped and start == 0:
        return None, True  # square causal pattern
    q_pos = torch.arange(start, total, device=device)[:, None]  # [S, 1]
    k_pos = torch.arange(total, device=device)[None, :]  # [1, T]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask, False


def with_cache(kv: KVSlot | None, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Write this forward's keys/values into ``kv`` and return all keys/values so far, plus the start position.

    k, v: [B, H_kv, S, Dh] -> (k [B, H_kv, T, Dh], v [B, H_kv, T, Dh], start) with ``T = start + S``.
    """
    if kv is None:
        return k, v, 0
    end = kv.start + k.shape[2]
    kv.key[:, :, kv.start : end] = k
    kv.value[:, :, kv.start : end] = v
    return kv.key[:, :, :end], kv.value[:, :, :end], kv.start


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    *,
    sliding_window: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over all keys: q [B, H, S, Dh], k/v [B, H_kv, T, Dh] -> [B, H, S, Dh].

    ``scale`` defaults to ``Dh ** -0.5``. ``bias`` (float, broadcastable to [B, H, S, T]) replaces the causal
    mask and must already carry it (ALiBi does). ``softcap`` squashes scores with ``tanh`` before the mask
    (Gemma 2); SDPA cannot do that, so it takes the explicit path.
    """
    h, h_kv = q.shape[1], k.shape[1]
    if softcap is not None:
        return _softcapped(q, k, v, start, sliding_window, scale, softcap)
    if bias is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=h != h_kv)
    mask, is_causal = attention_mask(start, q.shape[2], sliding_window, q.device)
    # enable_gqa shares each kv head across its query group without materialising copies
    # (measured on CPU, B=1 S=1 D=576: as fast as a grouped reshape, ~2.5x faster than expanding k/v).
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=h != h_kv
    )


def _softcapped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    sliding_window: int | None,
    scale: float | None,
    softcap: float,
) -> torch.Tensor:
    b, h, s, dh = q.shape
    h_kv, t = k.shape[1], k.shape[2]
    # Query head i uses kv head i // (H / H_kv): group the queries of one kv head along the rows.
    grouped = q.reshape(b, h_kv, (h // h_kv) * s, dh)  # [B, H_kv, G * S, Dh]
    scores = grouped @ k.transpose(-1, -2) * (dh**-0.5 if scale is None else scale)  # [B, H_kv, G * S, T]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, h, s, t)
    mask, is_causal = attention_mask(start, s, sliding_window, q.device)
    if is_causal:
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [B, H, S, T]
    return (probs.view(b, h_kv, -1, t) @ v).view(b, h, s, dh)


def split_grouped_qkv(
    qkv: torch.Tensor,
    num_groups: int,
    head_dim: int,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused projection laid out per kv group as ``[q_1 .. q_r, k, v]`` (Falcon, BLOOM), rotating q and k.

    qkv: [B, S, G * (r + 2) * Dh], cos/sin: [B, S, Dh] or None (no rotary)
    -> q [B, G * r, S, Dh], k [B, G, S, Dh], v [B, G, S, Dh].
    BLOOM and multi-head Falcon are ``r = 1`` (per head ``[q, k, v]``); multi-query Falcon is ``G = 1``.
    """
    b, s, _ = qkv.shape
    grouped = qkv.view(b, s, num_groups, -1, head_dim)  # [B, S, G, r + 2, Dh]
    r = grouped.shape[3] - 2
    qk = grouped[:, :, :, : r + 1]  # [B, S, G, r + 1, Dh]
    if cos is not None and sin is not None:
        qk = rotate(qk, cos[:, :, None, None], sin[:, :, None, None])  # q and k heads in one go
    q = qk[:, :, :, :r].reshape(b, s, num_groups * r, head_dim).transpose(1, 2)  # [B, H, S, Dh]
    k = qk[:, :, :, r].transpose(1, 2)  # [B, G, S, Dh]
    v = grouped[:, :, :, r + 1].transpose(1, 2)  # [B, G, S, Dh]
    return q, k, v


def avoid_cudnn_attention(device: torch.device) -> None:
    """Keep SDPA off cuDNN's attention kernels on CUDA (process-wide; flash and memory-efficient kernels remain).

    cuDNN builds an execution plan for every new (shape, strides) it sees, and decoding grows each session's
    cache by one token per step, so nearly every step is new. Measured on an H100 (``scripts/profile_span.py``:
    8B shape, 16 blocks, bf16, one session, every step one token longer): a decode step took 60-65 ms with
    cuDNN attention allowed and 7-10 ms without.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
