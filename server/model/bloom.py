"""One BLOOM decoder layer: LayerNorm, multi-head attention with ALiBi biases (no rotary), GELU MLP."""

from __future__ import annotations

import torch
from torch import nn

from server.model.activations import activation
from server.model.alibi import AlibiBias
from server.model.attention import KVSlot, attend, split_grouped_qkv, with_cache
from server.model.fused import Device, linear
from swarm.config import ModelSpec


class BloomAttention(nn.Module):
    """Self-attention over ``query_key_value`` interleaved per head as ``[q, k, v]``; ALiBi comes as a bias."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.head_dim = spec.head_dim
        d = spec.hidden_size
        self.query_key_value = linear(d, 3 * d, True, dtype, device)
        self.dense = linear(d, d, True, dtype, device)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, kv: KVSlot | None) -> torch.Tensor:
        # x: [B, S, D], bias: [1, H, S, T] (ALiBi plus the causal mask)
        b, s, d = x.shape
        q, k, v = split_grouped_qkv(self.query_key_value(x), self.num_heads, self.head_dim)  # each [B, H, S, Dh]
        k, v, _ = with_cache(kv, k, v)  # [B, H, T, Dh]
        out = attend(q, k, v, 0, bias=bias)  # [B, H, S, Dh]
        return self.dense(out.transpose(1, 2).reshape(b, s, d))


class BloomMLP(nn.Module):
    """dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        d = spec.hidden_size
        self.act = activation(spec.hidden_act)
        self.dense_h_to_4h = linear(d, spec.intermediate_size, True, dtype, device)
        self.dense_4h_to_h = linear(spec.intermediate_size, d, True, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    """HF names: ``input_layernorm``, ``self_attention.*``, ``post_attention_layernorm``, ``mlp.*``."""

    positional = AlibiBias  # one bias per span forward, shared by every block

    def __init__(self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        d, eps = spec.hidden_size, spec.layer_norm_eps
        self.residual_after_norm = spec.apply_residual_connection_post_layernorm
        self.input_layernorm = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
        self.self_attention = BloomAttention(spec, dtype=dtype, device=device)
        self.post_attention_layernorm = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
        self.mlp = BloomMLP(spec, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor, kv: KVSlot | None = None) -> torch.Tensor:
        # hidden: [B, S, D], bias: [1, H, S, T] -> [B, S, D]
        normed = self.input_layernorm(hidden)
        hidden = (normed if self.residual_after_norm else hidden) + self.self_attention(normed, bias, kv)
        normed = self.post_attention_layernorm(hidden)
        return (normed if self.residual_after_norm else hidden) + self.mlp(normed)
