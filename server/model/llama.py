"""One Llama-style decoder layer (Llama, Mistral, Qwen2): RMSNorm, GQA attention with RoPE, gated MLP.

Its attention and MLP are the building blocks of the other rotary families (Qwen3, Gemma 2, Mixtral).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.activations import activation
from server.model.attention import KVSlot, PackedKV, attend, attention_mask, with_cache
from server.model.fused import Device, Fused, fuse_linears, linear
from server.model.kv_pool import attend_pooled
from server.model.rotary import RotaryEmbedding, rotate
from server.model.tuning import LoraDelta, add_lora
from swarm.config import ModelSpec
from swarm.messages import LORA_TARGETS
from swarm.norm import RMSNorm

__all__ = ["KVSlot", "LlamaAttention", "PackedKV", "LlamaBlock", "LlamaMLP", "attention_mask"]


class LlamaAttention(Fused):
    """Grouped-query self-attention with rotary positions and an optional preallocated KV cache.

    Per-layer options come from the spec: sliding window (per ``layer_types``), scale
    (``query_pre_attn_scalar``) and score soft-capping (Gemma 2).
    """

    fused_weight: torch.Tensor
    fused_bias: torch.Tensor | None

    def __init__(self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.sliding_window = spec.sliding_window_for(layer_idx)
        self.scale = None if spec.query_pre_attn_scalar is None else spec.query_pre_attn_scalar**-0.5
        self.softcap = spec.attn_logit_softcapping
        d, dq, dkv = (
            spec.hidden_size,
            spec.num_attention_heads * spec.head_dim,
            spec.num_key_value_heads * spec.head_dim,
        )
        bias = spec.attention_bias
        self.q_proj = linear(d, dq, bias, dtype, device)
        self.k_proj = linear(d, dkv, bias, dtype, device)
        self.v_proj = linear(d, dkv, bias, dtype, device)
        self.o_proj = linear(dq, d, spec.attention_out_bias, dtype, device)
        self._fuse()

    def _fuse(self) -> None:
        self.fused_weight, self.fused_bias = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lora: LoraDelta | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, S, D] -> rotated q [B, H, S, Dh], rotated k [B, H_kv, S, Dh], v [B, H_kv, S, Dh]."""
        b, s, _ = x.shape
        h, h_kv = self.num_heads, self.num_kv_heads
        qkv = F.linear(x, self.fused_weight, self.fused_bias)  # [B, S, (H + 2 H_kv) * Dh]
        if lora is not None:
            widths = (h * self.head_dim, h_kv * self.head_dim, h_kv * self.head_dim)
            delta = lora.fused_delta(("q_proj", "k_proj", "v_proj"), widths, x)
            qkv = qkv if delta is None else qkv + delta
        qkv = qkv.view(b, s, h + 2 * h_kv, self.head_dim)
        # Rotate q and k heads in one go; cos/sin broadcast over heads.  qk: [B, S, H + H_kv, Dh]
        qk = rotate(self.norm_qk(qkv[:, :, : h + h_kv]), cos.unsqueeze(2), sin.unsqueeze(2))
        q = qk[:, :, :h].transpose(1, 2)  # [B, H, S, Dh]
        k = qk[:, :, h:].transpose(1, 2)  # [B, H_kv, S, Dh]
        v = qkv[:, :, h + h_kv :].transpose(1, 2)  # [B, H_kv, S, Dh]
        return q, k, v

    def norm_qk(self, qk: torch.Tensor) -> torch.Tensor:
        """A hook for per-head q/k norms before rotary (Qwen3); Llama has none.  qk: [B, S, H + H_kv, Dh]."""
        return qk

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVSlot | PackedKV | None,
        lora: LoraDelta | None = None,
    ) -> torch.Tensor:
        # x: [B, S, D], cos/sin: [B, S, Dh]; packed sessions: B = 1, S = T (all their tokens)
        b, s, _ = x.shape
        q, k, v = self.project(x, cos, sin, lora)
        if isinstance(kv, PackedKV) and kv.groups is not None and self._plain_causal:
            out = attend_pooled(q, k, v, kv.groups, kv.block, self.scale)  # one new token per row: a call per chunk
        elif isinstance(kv, PackedKV):
            # Each session attends over its own cache only: split, attend, join back to [1, H, T, Dh].
            parts = zip(kv.split(q), kv.split(k), kv.split(v), kv.slots, strict=True)
            out = PackedKV.join([self._attend(*part) for part in parts])
        else:
            out = self._attend(q, k, v, kv)  # [B, H, S, Dh]
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)  # [B, S, H * Dh]
        return add_lora(self.o_proj(out), lora, "o_proj", out)

    @property
    def _plain_causal(self) -> bool:
        return self.sliding_window is None and self.softcap is None

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVSlot | None) -> torch.Tensor:
        # q: [B, H, S, Dh], k/v: [B, H_kv, S, Dh] -> [B, H, S, Dh]
        k, v, start = with_cache(kv, k, v)  # [B, H_kv, T, Dh]
        return attend(q, k, v, start, sliding_window=self.sliding_window, scale=self.scale, softcap=self.softcap)


class LlamaMLP(Fused):
    """Gated feed-forward: down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    fused_weight: torch.Tensor
    fused_bias: torch.Tensor | None

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        d, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.act = activation(spec.hidden_act)
        self.gate_proj = linear(d, i, bias, dtype, device)
        self.up_proj = linear(d, i, bias, dtype, device)
        self.down_proj = linear(i, d, bias, dtype, device)
        self._fuse()

    def _fuse(self) -> None:
        self.fused_weight, self.fused_bias = fuse_linears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor, lora: LoraDelta | None = None) -> torch.Tensor:
        # x: [B, S, D]
        gate_up = F.linear(x, self.fused_weight, self.fused_bias)  # [B, S, 2I]
        if lora is not None:
            delta = lora.fused_delta(("gate_proj", "up_proj"), (self.up_proj.weight.shape[0],) * 2, x)
            gate_up = gate_up if delta is None else gate_up + delta
        gate, up = gate_up.chunk(2, dim=-1)  # each [B, S, I]
        inner = self.act(gate) * up  # [B, S, I]
        return add_lora(self.down_proj(inner), lora, "down_proj", inner)


class LlamaBlock(nn.Module):
    """One decoder layer; parameter names match a Hugging Face layer's (``self_attn.q_proj.weight``, ...)."""

    positional = RotaryEmbedding  # builds, per span forward, the (cos, sin) passed to every block
    packs_sessions = True
    """Its forward accepts ``PackedKV``: several sessions' steps in one call (see ``BlockSpan.forward_packed``)."""
    attention_class: type[LlamaAttention] = LlamaAttention
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Linears that take client-side LoRA (``lora=`` in forward); families without the attribute take none."""

    def __init__(self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        self.self_attn = self.attention_class(spec, layer_idx, dtype=dtype, device=device)
        self.mlp = LlamaMLP(spec, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, device=device)
        self.input_layernorm.requires_grad_(False)
        self.post_attention_layernorm.requires_grad_(False)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: KVSlot | None = None,
        lora: LoraDelta | None = None,
    ) -> torch.Tensor:
        # hidden: [B, S, D], cos/sin: [B, S, Dh] -> [B, S, D]
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv, lora)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), lora)
