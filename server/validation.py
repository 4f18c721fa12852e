"""Checks on everything a peer sends, before it reaches the model. Failures raise BadRequestError."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from hivemind.proto import runtime_pb2

from swarm.config import ModelSpec
from swarm.errors import BadRequestError
from swarm.lora import lora_shapes
from swarm.messages import TuningSpec
from swarm.tensors import WIRE_DTYPES, decode


def decode_tensors(messages: Sequence[runtime_pb2.Tensor], expected: int) -> list[torch.Tensor]:
    if len(messages) != expected:
        raise BadRequestError(f"expected {expected} tensor(s), got {len(messages)}")
    tensors = [decode(m) for m in messages]
    for tensor in tensors:
        if tensor.dtype not in WIRE_DTYPES:
            raise BadRequestError(f"tensor dtype {tensor.dtype} is not one of {', '.join(map(str, WIRE_DTYPES))}")
    return tensors


def check_hidden(
    hidden: torch.Tensor,
    hidden_size: int,
    max_tokens: int,
    batch_size: int | None = None,
) -> None:
    """hidden must be [B, S, hidden_size], finite, with B * S <= max_tokens (and B == batch_size if given)."""
    if hidden.ndim != 3 or hidden.shape[-1] != hidden_size or hidden.shape[1] == 0 or hidden.shape[0] == 0:
        raise BadRequestError(f"hidden states must have shape [batch, length, {hidden_size}], got {list(hidden.shape)}")
    if batch_size is not None and hidden.shape[0] != batch_size:
        raise BadRequestError(f"session was opened with batch size {batch_size}, got {hidden.shape[0]} rows")
    if hidden.shape[0] * hidden.shape[1] > max_tokens:
        raise BadRequestError(
            f"request carries {hidden.shape[0] * hidden.shape[1]} tokens, over this server's limit of {max_tokens}"
        )
    if not torch.isfinite(hidden).all():
        raise BadRequestError("hidden states contain NaN or infinity")


def check_span(start: int, end: int, hosted_start: int, hosted_end: int) -> None:
    if not hosted_start <= start < end <= hosted_end:
        raise BadRequestError(f"blocks {start}:{end} are not within this server's blocks {hosted_start}:{hosted_end}")


def check_tuning(
    spec: TuningSpec,
    tensors: Sequence[torch.Tensor],
    num_blocks: int,
    model: ModelSpec,
    lora_targets: Sequence[str],
    max_prompt_tokens: int,
    max_lora_rank: int,
) -> None:
    """Per-block trainables (``TuningSpec``) must have the shapes the model and the span imply, within limits."""
    if len(tensors) != spec.num_tensors:
        raise BadRequestError(
            f"tuning spec {spec.model_dump()} implies {spec.num_tensors} tensor(s), got {len(tensors)}"
        )
    expected: list[tuple[str, tuple[int, ...]]] = []
    if spec.prompts:
        if spec.prompts > max_prompt_tokens:
            raise BadRequestError(f"{spec.prompts} deep prompts are over this server's limit of {max_prompt_tokens}")
        expected.append(("deep prompts", (num_blocks, spec.prompts, model.hidden_size)))
    if spec.lora is not None:
        lora = spec.lora
        if lora.rank > max_lora_rank:
            raise BadRequestError(f"LoRA rank {lora.rank} is over this server's limit of {max_lora_rank}")
        if not math.isfinite(lora.alpha):
            raise BadRequestError(f"LoRA alpha must be finite, got {lora.alpha}")
        if len(set(lora.targets)) != len(lora.targets):
            raise BadRequestError(f"LoRA targets repeat: {list(lora.targets)}")
        unknown = [t for t in lora.targets if t not in lora_targets]
        if unknown:
            supported = ", ".join(lora_targets) or "none (this model family takes no LoRA)"
            raise BadRequestError(f"unknown LoRA target(s) {unknown}; this server supports: {supported}")
        shapes = lora_shapes(model)
        for target in lora.targets:
            d_in, d_out = shapes[target]
            expected.append((f"{target} lora_A", (num_blocks, lora.rank, d_in)))
            expected.append((f"{target} lora_B", (num_blocks, d_out, lora.rank)))
    for tensor, (name, shape) in zip(tensors, expected, strict=True):
        if tuple(tensor.shape) != shape:
            raise BadRequestError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise BadRequestError(f"{name} contain NaN or infinity")
