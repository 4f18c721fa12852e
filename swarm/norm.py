"""Normalisation layers shared by the client head and the server blocks: RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swarm.families import NormKind


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` computed in float32 and cast back to ``x.dtype`` (as HF Llama does)."""
    # x: [..., D], weight: [D]
    shape = (x.shape[-1],)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, shape, weight, eps)  # one fused op: this runs once or twice per block per token
    normed = F.rms_norm(x.float(), shape, None, eps).to(x.dtype)
    return weight * normed


def rms_norm_plus_one(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's ``(1 + weight) * x / rms(x)``, all in float32 and cast back at the end (as HF Gemma does)."""
    # x: [..., D], weight: [D] (stored as an offset from 1: a zero weight is the identity scale)
    return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + weight.float(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """A learned per-channel scale after RMS normalisation; the parameter is named ``weight`` as in HF."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class RMSNormPlusOne(RMSNorm):
    """Gemma's RMSNorm: the learned scale is ``1 + weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_plus_one(x, self.weight, self.eps)


def make_norm(
    kind: NormKind,
    dim: int,
    eps: float,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A norm of ``kind`` over the last ``dim`` channels with HF parameter names (``weight``, and ``bias``)."""
    if kind == "rms":
        return RMSNorm(dim, eps, dtype=dtype, device=device)
    if kind == "rms_plus_one":
        return RMSNormPlusOne(dim, eps, dtype=dtype, device=device)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, dtype=dtype, device=device)
    raise ValueError(f"unknown norm kind {kind!r}")
