"""One Falcon decoder layer (rotary only): fused grouped q/k/v, LayerNorm, attention and MLP in parallel.

Covers the new decoder architecture (Falcon-40B/180B: grouped kv heads, ``ln_attn`` + ``ln_mlp``) and the
old one (Falcon-7B: multi-query, one ``input_layernorm``; or multi-head, optionally sequential with a
``post_attention_layernorm``). ALiBi Falcon variants are refused when the config is read.
"""

from __future__ import annotations

import torch
from torch import nn

from server.model.activations import activation
from server.model.attention import KVSlot, attend, split_grouped_qkv, with_cache
from server.model.fused import Device, linear
from server.model.rotary import RotaryEmbedding
from swarm.config import ModelSpec


class FalconAttention(nn.Module):
    """Self-attention over ``query_key_value`` laid out per kv group as ``[q_1 .. q_r, k, v]`` heads.

    That one layout covers all of Falcon's: grouped (``G = num_kv_heads``), multi-query (``G = 1``) and
    multi-head (``r = 1``). Keys and values stay at ``G`` heads in the cache (transformers expands them).
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        d, qkv_out = spec.hidden_size, (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim
        self.query_key_value = linear(d, qkv_out, spec.attention_bias, dtype, device)
        self.dense = linear(spec.num_attention_heads * spec.head_dim, d, spec.attention_out_bias, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVSlot | None) -> torch.Tensor:
        # x: [B, S, D], cos/sin: [B, S, Dh]
        b, s, _ = x.shape
        qkv = self.query_key_value(x)  # [B, S, G * (r + 2) * Dh]
        q, k, v = split_grouped_qkv(qkv, self.num_kv_heads, self.head_dim, cos, sin)  # [B, H | G, S, Dh]
        k, v, start = with_cache(kv, k, v)  # [B, G, T, Dh]
        out = attend(q, k, v, start)  # [B, H, S, Dh]
        return self.dense(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class FalconMLP(nn.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x)))."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        d, i = spec.hidden_size, spec.intermediate_size
        self.act = activation(spec.hidden_act)
        self.dense_h_to_4h = linear(d, i, spec.mlp_bias, dtype, device)
        self.dense_4h_to_h = linear(i, d, spec.mlp_bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconBlock(nn.Module):
    """HF names: ``self_attention.*``, ``mlp.*`` and ``ln_attn``/``ln_mlp`` or ``input_layernorm``
    (+ ``post_attention_layernorm`` when sequential)."""

    positional = RotaryEmbedding

    def __init__(self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        d, eps = spec.hidden_size, spec.layer_norm_eps
        self.parallel = spec.parallel_attn
        self.self_attention = FalconAttention(spec, dtype=dtype, device=device)
        self.mlp = FalconMLP(spec, dtype=dtype, device=device)
        self.two_norms = spec.parallel_attn and spec.num_ln_in_parallel_attn == 2
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
            self.ln_mlp = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
        else:
            self.input_layernorm = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
            if not spec.parallel_attn:
                self.post_attention_layernorm = nn.LayerNorm(d, eps=eps, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVSlot | None = None
    ) -> torch.Tensor:
        # hidden: [B, S, D], cos/sin: [B, S, Dh] -> [B, S, D]
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(hidden), self.ln_mlp(hidden)
        else:
            attn_in = mlp_in = self.input_layernorm(hidden)
        attn = self.self_attention(attn_in, cos, sin, kv)
        if self.parallel:
            return hidden + (self.mlp(mlp_in) + attn)  # transformers' summation order
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))
