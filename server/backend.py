"""Compute for the hosted span: one worker thread runs every forward, backward and inference step in turn.

Handlers run on the event loop and hand tensors to this thread, so the loop stays responsive (heartbeats,
other sessions' I/O) while the model computes. A later batching scheduler replaces ``_executor`` with a queue.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from server.model import BlockSpan
from server.sessions import Session


class SpanBackend:
    def __init__(self, span: BlockSpan, start: int, end: int, dtype: torch.dtype, device: torch.device):
        self.span = span
        self.start = start
        self.end = end
        self.dtype = dtype
        self.device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    @staticmethod
    def _blocks(start: int, end: int) -> slice:
        return slice(start, end)  # BlockSpan takes absolute model block indices

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def inference_step(self, session: Session, hidden: torch.Tensor, position: int) -> torch.Tensor:
        return await self._run(self._inference_step, session, hidden, position)

    def _inference_step(self, session: Session, hidden: torch.Tensor, position: int) -> torch.Tensor:
        with torch.inference_mode():
            x = hidden.to(self.device, self.dtype)
            out = self.span(
                x,
                cache=session.cache,
                start_position=position,
                blocks=self._blocks(session.start, session.end),
            )
            session.length = position + hidden.shape[1]
            return out.to("cpu", hidden.dtype)

    async def forward(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return await self._run(self._forward, hidden, start, end)

    def _forward(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        with torch.inference_mode():
            out = self.span(hidden.to(self.device, self.dtype), blocks=self._blocks(start, end))
            return out.to("cpu", hidden.dtype)

    async def backward(self, hidden: torch.Tensor, grad_output: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return await self._run(self._backward, hidden, grad_output, start, end)

    def _backward(self, hidden: torch.Tensor, grad_output: torch.Tensor, start: int, end: int) -> torch.Tensor:
        with torch.enable_grad():
            x = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            out = self.span(x, blocks=self._blocks(start, end))
            (grad_input,) = torch.autograd.grad(out, x, grad_output.to(self.device, self.dtype))
            return grad_input.to("cpu", hidden.dtype)

    def measure_throughput(self, hidden_size: int, steps: int = 5) -> float:
        """Blocks per second for a one-token forward (what routing divides span lengths by)."""
        x = torch.randn(1, 1, hidden_size)
        self._forward(x, self.start, self.end)  # warm-up
        began = time.perf_counter()
        for _ in range(steps):
            self._forward(x, self.start, self.end)
        per_step = (time.perf_counter() - began) / steps
        return (self.end - self.start) / max(per_step, 1e-6)

    def shutdown(self) -> None:
        """Finish the steps already queued, then stop the compute thread."""
        self._executor.shutdown(wait=True)
