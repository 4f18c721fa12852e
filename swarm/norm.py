"""RMS normalisation, shared by the client head and the server blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` computed in float32 and cast back to ``x.dtype`` (as HF Llama does)."""
    # x: [..., D], weight: [D]
    shape = (x.shape[-1],)
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, shape, weight, eps)  # one fused op: this runs once or twice per block per token
    normed = F.rms_norm(x.float(), shape, None, eps).to(x.dtype)
    return weight * normed


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
