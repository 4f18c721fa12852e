"""The one tensor codec: hivemind's serializer, with the wire dtypes the swarm accepts."""

from __future__ import annotations

from typing import Literal

import torch
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.proto.runtime_pb2 import CompressionType

from swarm.errors import BadRequestError

WIRE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Compression = Literal["none", "float16"]
"""How activations travel: as they are, or as 16-bit floats (half the bytes). hivemind 1.1.12's 8-bit codecs
(UNIFORM_8BIT, QUANTILE_8BIT) fail to decode with numpy 2 ("only 0-dimensional arrays can be converted to Python
scalars"), so they are not offered."""

_CODECS: dict[str, int] = {"none": CompressionType.NONE, "float16": CompressionType.FLOAT16}


def encode(tensor: torch.Tensor, compression: Compression = "none") -> runtime_pb2.Tensor:
    return serialize_torch_tensor(tensor.detach().cpu(), _CODECS[compression])


def decode(message: runtime_pb2.Tensor) -> torch.Tensor:
    """Decode a tensor from the network; garbage raises BadRequestError, never anything else."""
    try:
        return deserialize_torch_tensor(message)
    except Exception as e:  # hivemind raises whatever numpy/torch raise on corrupt buffers
        raise BadRequestError(f"could not decode tensor: {type(e).__name__}: {e}") from None
