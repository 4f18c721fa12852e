"""Rotary position embeddings (RoPE) with the scaling variants Llama-family configs use."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from swarm.config import ModelSpec

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(spec: ModelSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """The per-pair rotation speeds ``[head_dim // 2]`` in float32, after the config's rope scaling."""
    dim = spec.head_dim
    # Same expression as transformers' default init, so the float32 values match bit for bit.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    inv_freq = 1.0 / (spec.rope_theta**exponents)
    scaling = spec.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_scaling(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend smoothly in between.

    Follows ``_compute_llama3_parameters`` in transformers' ``modeling_rope_utils``.
    """
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Turns token positions into the cos/sin tables that ``apply_rotary`` needs (one per span forward)."""

    def __init__(self, spec: ModelSpec, device: torch.device | str | None = None):
        super().__init__()
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inverse_frequencies(spec, device), persistent=False)

    def forward(self, start: int, length: int, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The positional inputs of a span forward at positions ``[start, start + length)``: ``(cos, sin)``."""
        positions = torch.arange(start, start + length, device=self.inv_freq.device).expand(batch, length)
        return self.cos_sin(positions, dtype)  # each [B, S, Dh]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: LongTensor [B, S] -> (cos, sin), each [B, S, head_dim] in ``dtype``.

        Angles are computed in float32 whatever ``dtype`` is, as transformers does.
        """
        freqs = positions[..., None].float() * self.inv_freq  # [B, S, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE for tables already broadcastable to ``x`` (rotate_half convention: pairs are (i, i + Dh/2))."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, Dh], cos/sin: [B, S, Dh] -> [B, H, S, Dh], as transformers' ``apply_rotary_pos_emb``."""
    return rotate(x, cos.unsqueeze(1), sin.unsqueeze(1))
