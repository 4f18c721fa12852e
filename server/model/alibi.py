"""ALiBi (Press et al., "Train Short, Test Long"): a per-head linear bias on key positions instead of rotary."""

from __future__ import annotations

import math

import torch
from torch import nn

from swarm.config import ModelSpec


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-head slopes ``[H]`` in float32: a geometric series ``2^(-8/n) ** (1..n)`` for the nearest power of
    two ``n``, then every other term of the series for ``2n`` to fill the remaining heads (as BLOOM does)."""
    n = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-8 / n), dtype=torch.float32, device=device)
    slopes = base ** torch.arange(1, n + 1, dtype=torch.int32, device=device)
    if n != num_heads:
        extra_base = torch.tensor(2 ** (-8 / (2 * n)), dtype=torch.float32, device=device)
        extra = extra_base ** torch.arange(1, 2 * (num_heads - n), 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, extra])
    return slopes


class AlibiBias(nn.Module):
    """Turns a span forward's positions into one float attention bias shared by all its blocks.

    The bias of key ``j`` is ``slope_h * j`` rather than ``slope_h * (j - i)``: the two differ by a constant
    per query row, which softmax ignores (transformers' BLOOM relies on the same fact). Masked keys get -inf.
    """

    def __init__(self, spec: ModelSpec, device: torch.device | str | None = None):
        super().__init__()
        self.slopes: torch.Tensor
        self.register_buffer("slopes", alibi_slopes(spec.num_attention_heads, device), persistent=False)

    def forward(self, start: int, length: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor]:
        """-> ``(bias [1, H, S, T],)`` for queries at ``[start, start + length)`` over keys ``[0, T)``."""
        total = start + length
        k_pos = torch.arange(total, device=self.slopes.device)  # [T]
        bias = self.slopes[:, None, None] * k_pos  # [H, 1, T]
        if length > 1:
            q_pos = torch.arange(start, total, device=k_pos.device)[:, None]  # [S, 1]
            bias = bias.masked_fill(k_pos > q_pos, float("-inf"))  # [H, S, T]
        return (bias.to(dtype).unsqueeze(0),)
