"""Causal self-attention pieces every family shares: the KV cache slot, masks, and the attention itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.rotary import rotate


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
    positions ``[slot_i.start, slot_i.start + length_i)``. The projections, norms and MLP run once on all
    tokens ([1, T, D]); attention runs per session over that session's own cache (``slot_i``), so no session
    sees another's keys and no cache is copied. Chosen over padding every session to one [B, S_max] batch:
    decode rows differ in cache length, and per-session SDPA at S=1 costs little next to the weight matmuls.
    """

    slots: list[KVSlot]
    batches: list[int]
    lengths: list[int]
    decode_mask: torch.Tensor | None = None
    """When every session brings one token per row (decoding): which cached positions each row sees,
    bool [rows, 1, 1, longest]; lets ``attend_decode_rows`` run all rows as ONE attention call. The same for
    every block of a forward, so ``BlockSpan.forward_packed`` builds it once."""

    @staticmethod
    def make_decode_mask(starts: list[int], batches: list[int], device: torch.device) -> torch.Tensor:
        """Sessions at positions ``starts`` with ``batches`` rows each -> bool [rows, 1, 1, longest]."""
        ends = torch.tensor([start + 1 for start, b in zip(starts, batches, strict=True) for _ in range(b)])
        longest = int(ends.max())
        return (torch.arange(longest)[None, :] < ends[:, None]).to(device)[:, None, None, :]

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


def attend_decode_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedKV, scale: float | None = None
) -> torch.Tensor:
    """Packed decode steps as ONE attention call: q [1, H, T, Dh], k/v [1, H_kv, T, Dh] -> [1, H, T, Dh].

    Every one of the T rows is one new token of some session (``packed.decode_mask`` is set). Each row's key
    and value go into its session's cache; then every row's cached keys/values are copied side by side,
    padded to the longest, and masked per row. Per-session attention costs a dozen small kernel launches per
    session per block; on a GPU that loop, not the math, bounded a 16-session decode step (measured with
    ``scripts/profile_span.py``). The copies are cheap next to reading the weights. Plain causal attention
    only (no sliding window, soft-capping or bias); the callers check.
    """
    mask = packed.decode_mask
    assert mask is not None
    rows, longest = mask.shape[0], mask.shape[-1]
    h, h_kv, dh = q.shape[1], k.shape[1], k.shape[3]
    new_k = list(k[0].transpose(0, 1).split(packed.batches))  # each [B_i, H_kv, Dh]
    new_v = list(v[0].transpose(0, 1).split(packed.batches))
    keys = k.new_zeros(rows, h_kv, longest, dh)
    values = v.new_zeros(rows, h_kv, longest, dh)
    into, cached, row = [], [], 0
    for slot, b in zip(packed.slots, packed.batches, strict=True):
        end = slot.start + 1
        into += [keys[row : row + b, :, :end], values[row : row + b, :, :end]]
        cached += [slot.key[:, :, :end], slot.value[:, :, :end]]
        row += b
    # One C++ loop per list instead of a Python one (torch._foreach_copy_ takes strided views).
    torch._foreach_copy_(
        [slot.key[:, :, slot.start] for slot in packed.slots] + [slot.value[:, :, slot.start] for slot in packed.slots],
        new_k + new_v,
    )
    torch._foreach_copy_(into, cached)
    queries = q[0].transpose(0, 1).unsqueeze(2)  # [T, H, 1, Dh]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=h != h_kv)
    return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # [1, H, T, Dh]


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
