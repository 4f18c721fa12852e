"""Linears kept under their Hugging Face names but stored as views into one fused tensor per group."""

from __future__ import annotations

import torch
from torch import nn

Device = torch.device | str | None


def linear(d_in: int, d_out: int, bias: bool, dtype: torch.dtype | None, device: Device) -> nn.Linear:
    """An ``nn.Linear`` without random init: weights are loaded right after construction (init is slow when big)."""
    layer = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=bias, dtype=dtype, device=device)
    layer.requires_grad_(False)
    return layer


def fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the linears' weights (and biases) along the output rows; make each linear a view into it.

    Returns ``(weight [sum(out), in], bias [sum(out)] or None)``. ``load_state_dict`` with HF names then
    writes through the views in place, so the fused tensors always hold the loaded weights.
    """
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(weight[row : row + rows], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[row : row + rows], requires_grad=False)
        row += rows
    return weight, bias


class Fused(nn.Module):
    """Base for modules whose HF linears are views into fused tensors, made by ``_fuse``.

    A fused matmul saves per-op overhead in single-token decode; the views keep ``load_state_dict``
    with Hugging Face names working (it copies in place). Do not load with ``assign=True``: that
    would break the views.
    """

    def _fuse(self) -> None:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to() / .half() give each parameter fresh storage; rebuild the fused tensors and views after it.
        super()._apply(fn, recurse)
        self._fuse()
        return self
