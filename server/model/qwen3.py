"""One Qwen3 decoder layer: a Llama layer whose q and k heads are RMS-normalised per head before rotary."""

from __future__ import annotations

import torch

from server.model.fused import Device
from server.model.llama import LlamaAttention, LlamaBlock
from swarm.config import ModelSpec
from swarm.norm import RMSNorm


class Qwen3Attention(LlamaAttention):
    """Llama attention plus ``q_norm`` / ``k_norm`` ([head_dim] weights shared by all heads of q, resp. k)."""

    def __init__(self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__(spec, layer_idx, dtype=dtype, device=device)
        self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype=dtype, device=device).requires_grad_(False)
        self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps, dtype=dtype, device=device).requires_grad_(False)

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        # qk: [B, S, H + H_kv, Dh]; normalised here, then rotated together by the caller.
        h = self.num_heads
        return torch.cat([self.q_norm(qk[:, :, :h]), self.k_norm(qk[:, :, h:])], dim=2)


class Qwen3Block(LlamaBlock):
    """A Llama decoder layer with Qwen3 attention; HF names add ``self_attn.q_norm`` / ``self_attn.k_norm``."""

    attention_class = Qwen3Attention
