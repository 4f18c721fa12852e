"""Checks on everything a peer sends, before it reaches the model. Failures raise BadRequestError."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hivemind.proto import runtime_pb2

from swarm.errors import BadRequestError
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
