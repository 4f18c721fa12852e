"""Test-only server entry point whose blocks return corrupted activations: a lying server for spot-check tests.

    python -m tests.e2e.corrupt_server run ...   (the same arguments as ``python -m server.cli``)

The outputs of inference steps and stateless forwards get noise as large as the activations themselves; the
KV cache and everything else stay honest, so the server looks healthy in every other way. It also overstates its
speed, as a server that wants traffic would, so that clients route through it.
"""

from __future__ import annotations

import functools

import torch

from server.backend import SpanBackend
from server.cli import main

NOISE = 1.0
"""Noise standard deviation relative to the output's own."""


def _corrupting(method):
    @functools.wraps(method)
    async def corrupted(self, *args, **kwargs) -> torch.Tensor:
        out = await method(self, *args, **kwargs)  # [B, S, D]
        return out + NOISE * out.std() * torch.randn_like(out)

    return corrupted


def _overstated(self, *args, **kwargs) -> float:
    return 1e6


SpanBackend.inference_step = _corrupting(SpanBackend.inference_step)
SpanBackend.forward = _corrupting(SpanBackend.forward)
SpanBackend.measure_throughput = _overstated

if __name__ == "__main__":
    main()
