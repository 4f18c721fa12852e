"""One Mixtral decoder layer: Llama attention and a sparse mixture of SwiGLU experts with top-k routing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from server.model.activations import activation
from server.model.attention import KVSlot
from server.model.fused import Device, Fused, fuse_linears, linear
from server.model.llama import LlamaAttention
from server.model.rotary import RotaryEmbedding
from swarm.config import ModelSpec
from swarm.norm import RMSNorm


class MixtralExpert(nn.Module):
    """One expert's HF-named linears (``w1`` gate, ``w3`` up, ``w2`` down); the math runs on the fused stacks."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        d, i = spec.hidden_size, spec.intermediate_size
        self.w1 = linear(d, i, False, dtype, device)
        self.w2 = linear(i, d, False, dtype, device)
        self.w3 = linear(d, i, False, dtype, device)


class SparseMoE(Fused):
    """Route each token to its top-k experts and sum their outputs, weighted by a softmax over the chosen
    router logits (equal to transformers' softmax-over-all then renormalise-over-top-k).

    HF checkpoints keep ``experts.{e}.w{1,2,3}.weight``; here they are views into two stacks,
    ``gate_up [E, 2I, D]`` and ``down [E, D, I]``.
    """

    gate_up: torch.Tensor
    down: torch.Tensor

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        if not 0 < spec.num_experts_per_tok <= spec.num_local_experts:
            raise ValueError(
                f"mixture of experts needs 0 < num_experts_per_tok ({spec.num_experts_per_tok})"
                f" <= num_local_experts ({spec.num_local_experts})"
            )
        self.top_k = spec.num_experts_per_tok
        self.act = activation(spec.hidden_act)
        self.gate = linear(spec.hidden_size, spec.num_local_experts, False, dtype, device)
        self.experts = nn.ModuleList(
            MixtralExpert(spec, dtype=dtype, device=device) for _ in range(spec.num_local_experts)
        )
        self._fuse()

    def _fuse(self) -> None:
        e = len(self.experts)
        gate_up, _ = fuse_linears([lin for ex in self.experts for lin in (ex.w1, ex.w3)])  # type: ignore[union-attr]
        down, _ = fuse_linears([ex.w2 for ex in self.experts])  # type: ignore[union-attr,misc]
        self.gate_up = gate_up.view(e, -1, gate_up.shape[1])  # [E, 2I, D]: rows w1 then w3 per expert
        self.down = down.view(e, -1, down.shape[1])  # [E, D, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, D]
        b, s, d = x.shape
        flat = x.reshape(b * s, d)  # [N, D]
        top_logits, top_idx = self.gate(flat).topk(self.top_k, dim=-1)  # each [N, k]
        weights = torch.softmax(top_logits.float(), dim=-1)  # [N, k], float32 as transformers keeps them
        # Few tokens (decode): gather just the chosen experts' weights and run them as batched matmuls -- a
        # fixed handful of ops. The gathered copy is at most one layer's experts when N * k <= E.
        if flat.shape[0] * self.top_k <= len(self.experts):
            out = self._gathered(flat, top_idx, weights)
        else:
            out = self._per_expert(flat, top_idx, weights)
        return out.view(b, s, d)

    def _gathered(self, flat: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # flat: [N, D], top_idx/weights: [N, k]
        h = torch.einsum("nd,nkid->nki", flat, self.gate_up[top_idx])  # [N, k, 2I]
        gate, up = h.chunk(2, dim=-1)  # each [N, k, I]
        out = torch.einsum("nki,nkdi->nkd", self.act(gate) * up, self.down[top_idx])  # [N, k, D]
        return (out * weights[..., None]).sum(dim=1).to(flat.dtype)  # [N, D]

    def _per_expert(self, flat: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Many tokens (prefill): one pass per expert over the tokens routed to it.
        out = torch.zeros_like(flat)  # [N, D]
        for e in top_idx.unique().tolist():
            token, slot = (top_idx == e).nonzero(as_tuple=True)  # each [n_e]
            gate, up = F.linear(flat[token], self.gate_up[e]).chunk(2, dim=-1)  # each [n_e, I]
            h = F.linear(self.act(gate) * up, self.down[e])  # [n_e, D]
            out.index_add_(0, token, (h * weights[token, slot, None]).to(out.dtype))
        return out


class MixtralBlock(nn.Module):
    """HF names: ``self_attn.*``, ``block_sparse_moe.gate.weight``, ``block_sparse_moe.experts.{e}.w{1,2,3}``."""

    positional = RotaryEmbedding
    packs_sessions = True  # its attention is LlamaAttention, which takes PackedKV; the rest is per token

    def __init__(self, spec: ModelSpec, layer_idx: int, *, dtype: torch.dtype | None = None, device: Device = None):
        super().__init__()
        self.self_attn = LlamaAttention(spec, layer_idx, dtype=dtype, device=device)
        self.block_sparse_moe = SparseMoE(spec, dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype=dtype, device=device)
        self.requires_grad_(False)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVSlot | None = None
    ) -> torch.Tensor:
        # hidden: [B, S, D], cos/sin: [B, S, Dh] -> [B, S, D]
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, kv)
        return hidden + self.block_sparse_moe(self.post_attention_layernorm(hidden))
