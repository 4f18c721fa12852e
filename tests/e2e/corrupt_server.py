"""Test-only server entry point whose blocks return corrupted activations: a lying server for spot-check tests.

    python -m tests.e2e.corrupt_server [--honest-steps N] run ...   (then the arguments of ``python -m server.cli``)

Outputs of stateless forwards, and of inference steps after the first N of each session (default 0), get noise
as large as the activations' spread; the KV cache and everything else stay honest, so the server looks healthy
in every other way. It also overstates its speed, as a server that wants traffic would, so that clients route
through it.
"""

from __future__ import annotations

import argparse
import functools
from collections import Counter

import torch

from server.backend import SpanBackend
from server.cli import main

NOISE = 1.0
"""Noise standard deviation relative to the output's own."""


def corrupt(out: torch.Tensor) -> torch.Tensor:
    return out + NOISE * out.std() * torch.randn_like(out)  # [B, S, D]


def lie_after(honest_steps: int) -> None:
    steps: Counter[str] = Counter()
    inference_step, forward = SpanBackend.inference_step, SpanBackend.forward

    @functools.wraps(inference_step)
    async def lying_inference_step(self, session, *args, **kwargs) -> torch.Tensor:
        out = await inference_step(self, session, *args, **kwargs)
        steps[session.session_id] += 1
        return out if steps[session.session_id] <= honest_steps else corrupt(out)

    @functools.wraps(forward)
    async def lying_forward(self, *args, **kwargs) -> torch.Tensor:
        return corrupt(await forward(self, *args, **kwargs))

    SpanBackend.inference_step = lying_inference_step
    SpanBackend.forward = lying_forward
    SpanBackend.measure_throughput = lambda self, *args, **kwargs: 1e6


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--honest-steps", type=int, default=0, help="inference steps answered honestly per session")
    ours, rest = parser.parse_known_args()
    lie_after(ours.honest_steps)
    main(rest)
