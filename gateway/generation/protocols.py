"""Structural types for the swarm client, its inference sessions and the local model head (fakes in tests)."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

import torch

from swarm.records import ModelCoverage
from swarm.span_tensors import SpanTensors


class InferenceSessionLike(Protocol):
    """One open inference session over every block of a model."""

    @property
    def position(self) -> int: ...

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, D] embeddings -> [B, S, D] hidden states after the last block."""
        ...


class SwarmClientLike(Protocol):
    """The part of ``swarm.client.SwarmClient`` that the gateway uses."""

    async def model_coverage(self, model_id: str) -> ModelCoverage: ...

    def inference_session(
        self,
        model_id: str,
        *,
        max_length: int,
        batch_size: int,
        extras: SpanTensors | None = None,
        adapter: str | None = None,
    ) -> AbstractAsyncContextManager[InferenceSessionLike]:
        """``extras``: per-block tensors for every block (deep prompts); ``adapter``: a LoRA adapter by name."""
        ...

    async def shutdown(self) -> None: ...


class ModelHeadLike(Protocol):
    """The client-side pieces of a model (``swarm.head.ModelHead``)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, S] int64 -> [B, S, D]."""
        ...

    def logits(self, hidden: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """hidden: [B, S, D] -> float32 [B, S, V] ([B, 1, V] with last_only)."""
        ...
