"""One Gemma 2 decoder layer: (1 + w) RMSNorms before and after attention and MLP, GELU-tanh gated MLP.

Attention is Llama's with Gemma's options, read from the spec: ``query_pre_attn_scalar`` scaling, tanh
soft-capping of the scores, and a sliding window on the layers ``layer_types`` marks (every other one).
"""

from __future__ import annotations

import torch
from torch import nn

from server.model.attention import KVSlot
from server.model.fused import Device
from server.model.llama import LlamaAttention, LlamaMLP
from server.model.rotary import RotaryEmbedding
from swarm.config import ModelSpec
from swarm.norm import RMSNormPlusOne


class Gemma2Block(nn.Module):
    """HF names: ``self_attn.*``, ``mlp.*``, ``{input,post_attention,pre_feedforward,post_feedforward}_layernorm``."""

    positional = RotaryEmbedding
    packs_sessions = True  # its attention is LlamaAttention, which takes PackedKV; the rest is per token

    def __init__(self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        self.self_attn = LlamaAttention(spec, layer_idx, dtype=dtype, device=device)
        self.mlp = LlamaMLP(spec, dtype=dtype, device=device)
        d, eps = spec.hidden_size, spec.rms_norm_eps
        self.input_layernorm = RMSNormPlusOne(d, eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNormPlusOne(d, eps, dtype=dtype, device=device)
        self.pre_feedforward_layernorm = RMSNormPlusOne(d, eps, dtype=dtype, device=device)
        self.post_feedforward_layernorm = RMSNormPlusOne(d, eps, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVSlot | None = None
    ) -> torch.Tensor:
        # hidden: [B, S, D], cos/sin: [B, S, Dh] -> [B, S, D]
        hidden = hidden + self.post_attention_layernorm(self.self_attn(self.input_layernorm(hidden), cos, sin, kv))
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
