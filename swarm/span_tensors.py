"""Per-block trainable tensors that travel with a span request (deep prompts, client-side LoRA factors)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swarm.messages import TuningSpec


@dataclass(frozen=True)
class SpanTensors:
    """What ``spec`` describes, in its order; every tensor has one row per block on dim 0 (``TuningSpec``)."""

    spec: TuningSpec
    tensors: tuple[torch.Tensor, ...]

    def slice(self, lo: int, hi: int) -> SpanTensors:
        """The rows of blocks [lo, hi), counted from the first block these tensors cover."""
        return SpanTensors(self.spec, tuple(t[lo:hi] for t in self.tensors))

    def detached(self) -> SpanTensors:
        return SpanTensors(self.spec, tuple(t.detach() for t in self.tensors))
