"""Per-request tuning applied from outside the block weights: deep prompts and client-side LoRA factors.

Blocks never change their weights. ``BlockSpan.forward`` adds a block's deep prompts to its input and hands the
block a ``BlockLora`` whose ``delta`` the block adds to the output of each adapted linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swarm.messages import TuningSpec


class LoraDelta:
    """What a block is handed as ``lora``: the LoRA delta of each adapted linear for that linear's input."""

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor | None:
        """x: [..., in] -> [..., out], or None when ``target`` is not adapted."""
        raise NotImplementedError

    def fused_delta(self, targets: Sequence[str], widths: Sequence[int], x: torch.Tensor) -> torch.Tensor | None:
        """The deltas of linears fused side by side (q|k|v, gate|up): [..., sum(widths)], zeros where a target is
        not adapted; None when none of them is."""
        parts = [self.delta(t, x) for t in targets]
        if all(p is None for p in parts):
            return None
        return torch.cat(
            [p if p is not None else x.new_zeros(*x.shape[:-1], w) for p, w in zip(parts, widths, strict=True)], dim=-1
        )


@dataclass(frozen=True)
class BlockLora(LoraDelta):
    """One block's LoRA: target -> (A [r, in], B [out, r]); ``delta`` is ``scale * B A x``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scale: float

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor | None:
        factor = self.factors.get(target)
        if factor is None:
            return None
        a, b = factor
        return F.linear(F.linear(x, a), b) * self.scale  # [..., r] -> [..., out]


@dataclass(frozen=True)
class PackedLora(LoraDelta):
    """Per-session LoRA for several sessions' tokens packed side by side ([1, T, D], ``BlockSpan.forward_packed``):
    segment ``i`` (``sizes[i]`` tokens) gets ``parts[i]``'s delta, or none. The base matmul still runs once."""

    parts: list[BlockLora | None]
    sizes: list[int]

    def delta(self, target: str, x: torch.Tensor) -> torch.Tensor | None:
        # x: [1, T, in] -> [1, T, out]
        pieces = x.split(self.sizes, dim=1)
        deltas = [lora.delta(target, p) if lora else None for lora, p in zip(self.parts, pieces, strict=True)]
        width = next((d.shape[-1] for d in deltas if d is not None), None)
        if width is None:
            return None
        return torch.cat(
            [d if d is not None else p.new_zeros(*p.shape[:-1], width) for d, p in zip(deltas, pieces, strict=True)],
            dim=1,
        )


def add_lora(out: torch.Tensor, lora: LoraDelta | None, target: str, x: torch.Tensor) -> torch.Tensor:
    """``out`` (the linear's output for input ``x``) plus that linear's LoRA delta, if any."""
    delta = lora.delta(target, x) if lora is not None else None
    return out if delta is None else out + delta


@dataclass(frozen=True)
class SpanTuning:
    """Tuning for the blocks one forward runs; row ``j`` of each tensor belongs to the ``j``-th block that runs."""

    prompts: torch.Tensor | None = None  # [N, K, D]
    lora: Sequence[BlockLora] | None = None

    @classmethod
    def from_tensors(cls, spec: TuningSpec, tensors: Sequence[torch.Tensor]) -> SpanTuning:
        """Build from the tensors a request carried (shapes already checked, ``server.validation``)."""
        tensors = list(tensors)
        prompts = tensors.pop(0) if spec.prompts else None
        lora = None
        if spec.lora is not None:
            pairs = {t: (tensors[2 * i], tensors[2 * i + 1]) for i, t in enumerate(spec.lora.targets)}
            num_blocks = next(iter(pairs.values()))[0].shape[0]
            lora = [
                BlockLora({t: (a[j], b[j]) for t, (a, b) in pairs.items()}, spec.lora.scale) for j in range(num_blocks)
            ]
        return cls(prompts, lora)

    def with_adapter(self, adapter: Sequence[BlockLora]) -> SpanTuning:
        """This tuning's prompts with a server-side adapter's LoRA (rows for the blocks that run)."""
        return SpanTuning(self.prompts, adapter)

    def block_lora(self, j: int) -> BlockLora | None:
        return self.lora[j] if self.lora is not None else None

    def add_prompts(self, j: int, hidden: torch.Tensor, start_position: int) -> torch.Tensor:
        """hidden [B, S, D] at positions [start_position, start_position + S): add block ``j``'s prompts to the
        positions below K (a decode step past them is unchanged)."""
        if self.prompts is None:
            return hidden
        prompts = self.prompts[j]  # [K, D]
        n = min(prompts.shape[0] - start_position, hidden.shape[1])
        if n <= 0:
            return hidden
        head = hidden[:, :n] + prompts[start_position : start_position + n].to(hidden.dtype)  # [B, n, D]
        return torch.cat([head, hidden[:, n:]], dim=1)
