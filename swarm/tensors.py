"""The one tensor codec: hivemind's serializer, with the wire dtypes the swarm accepts."""

from __future__ import annotations

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType

from swarm.errors import BadRequestError

WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def encode(tensor: torch.Tensor, compression: int = CompressionType.NONE) -> runtime_pb2.Tensor:
    return serialize_torch_tensor(tensor.detach(), compression)


def decode(message: runtime_pb2.Tensor) -> torch.Tensor:
    """Decode a tensor from the network; garbage raises BadRequestError, never anything else."""
    try:
        return deserialize_torch_tensor(message)
    except Exception as e:  # hivemind raises whatever numpy/torch raise on corrupt buffers
        raise BadRequestError(f"could not decode tensor: {type(e).__name__}: {e}") from None
