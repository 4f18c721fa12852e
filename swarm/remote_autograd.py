"""Remote blocks as a differentiable function: ``loss.backward()`` reaches local tensors through the swarm.

    blocks = RemoteBlocks(client, model_id, 0, num_blocks, run=loop.run)
    out = blocks(hidden)      # hidden [B, S, D] (may require grad) -> [B, S, D]
    loss(out).backward()      # hidden.grad (and whatever produced hidden: prompts, embeddings) is filled
    out = blocks(hidden, lora.span_tensors())   # per-block trainables (deep prompts, LoRA) get gradients too

Forward runs ``rpc_forward`` hop by hop and keeps each hop's input; backward runs ``rpc_backward`` hop by hop in
reverse with those inputs (servers recompute their activations, so they keep no state between the two; the idea
is Petals' ``_RemoteSequentialAutogradFunction``). The servers' weights never change: only gradients with
respect to the hidden states (and to the per-block trainables sent along, each hop its own rows) come back.

Failover: a hop that fails with a retryable ``SwarmError`` is banned and its span re-routed afresh (maybe over
several servers); in backward the replacement hops' inputs are recomputed by a forward over the new route first.
Both directions share one retry budget per call, ``client.config.max_retries``. A hop that a spot-check
(``swarm.spot_check``) catches returning wrong activations is rerouted the same way.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
from torch.autograd.function import once_differentiable

from swarm.errors import SwarmError, WrongActivationsError
from swarm.routing import Hop
from swarm.span_call import call_backward, call_forward
from swarm.span_tensors import SpanTensors
from swarm.spot_check import SpotChecker

if TYPE_CHECKING:
    from swarm.client import SwarmClient

logger = logging.getLogger(__name__)

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]
"""Runs a coroutine on the client's event loop and waits for it (``_LoopThread.run``; ``asyncio.run`` in tests)."""


class ForwardCall(Protocol):
    def __call__(
        self, client: Any, model_id: str, hop: Hop, hidden: torch.Tensor, extras: SpanTensors | None = None
    ) -> Awaitable[torch.Tensor]: ...


class BackwardCall(Protocol):
    def __call__(
        self,
        client: Any,
        model_id: str,
        hop: Hop,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        extras: SpanTensors | None = None,
    ) -> Awaitable[tuple[torch.Tensor, list[torch.Tensor]]]: ...


@dataclass(frozen=True)
class TracedHop:
    """A hop that ran, with the input it was given: all that backward needs to ask for this span's gradient."""

    hop: Hop
    hidden: torch.Tensor  # [B, S, D]


class _RetryBudget:
    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def spend(self, error: SwarmError) -> None:
        """Count one failover, or re-raise ``error`` when it is not retryable or the budget is spent."""
        self.used += 1
        if not error.retryable or self.used > self.limit:
            raise error


class RemoteBlocks:
    """Blocks [start, end) of ``model_id`` in the swarm, callable on hidden states with autograd support.

    ``forward_call`` / ``backward_call`` are the transport seam (``swarm.span_call`` by default); tests pass
    in-process fakes.
    """

    def __init__(
        self,
        client: SwarmClient,
        model_id: str,
        start: int,
        end: int,
        run: Runner | None = None,
        *,
        forward_call: ForwardCall = call_forward,
        backward_call: BackwardCall = call_backward,
        adapter: str | None = None,
        spot_checker: SpotChecker | None = None,
    ):
        self.client = client
        self.adapter = adapter
        """A LoRA adapter served by name: routes use only servers announcing it, and every call asks for it."""
        self.model_id = model_id
        self.start = start
        self.end = end
        self.run = run
        """Runs a coroutine to completion from synchronous code (autograd calls us there); needed for ``__call__``
        only, not for the async ``forward_traced`` / ``backward_traced``."""
        self._forward_call = forward_call
        self._backward_call = backward_call
        self._spot_checker = spot_checker
        """Recomputes a share of the hops on another server (``swarm.spot_check``); None: no checks."""

    def __call__(self, hidden: torch.Tensor, extras: SpanTensors | None = None) -> torch.Tensor:
        """hidden: [B, S, D] -> [B, S, D] after the last block; differentiable with respect to ``hidden`` and to
        ``extras``' tensors (per-block trainables with one row per block of [start, end) on dim 0)."""
        if self.run is None:
            raise TypeError("RemoteBlocks needs a `run` function to be called synchronously")
        if extras is None or not extras.tensors:
            return _RemoteBlocksFunction.apply(hidden, self, None)
        return _RemoteBlocksFunction.apply(hidden, self, extras.spec, *extras.tensors)

    # --- async halves, run on the client's loop ----------------------------------------------------------------
    async def forward_traced(
        self,
        hidden: torch.Tensor,
        start: int | None = None,
        end: int | None = None,
        budget: _RetryBudget | None = None,
        extras: SpanTensors | None = None,
    ) -> tuple[torch.Tensor, list[TracedHop]]:
        """Run blocks [start, end) hop by hop; return the output and each hop that ran with its input."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        budget = budget or _RetryBudget(self.client.config.max_retries)
        pending = deque(await self._route(start, end))
        trace: list[TracedHop] = []
        while pending:
            hop = pending.popleft()
            try:
                out = await self._forward_call(
                    self.client, self.model_id, hop, hidden, self._rows(extras, hop), **self._adapter_kwargs()
                )
                if extras is None and self.adapter is None:  # checkers recompute the plain blocks only
                    await self._spot_check(hop, hidden, out)
            except SwarmError as e:
                budget.spend(e)
                self._log_failover("forward", hop, e)
                self.client.bans.ban(hop.peer_id)
                pending.extendleft(reversed(await self._route(hop.start, hop.end, fresh=True)))
                continue
            trace.append(TracedHop(hop, hidden))
            hidden = out
        return hidden, trace

    async def _spot_check(self, hop: Hop, hidden: torch.Tensor, out: torch.Tensor) -> None:
        """Raise ``WrongActivationsError`` (the hop is then redone elsewhere) if a spot-check caught ``hop``."""
        checker = self._spot_checker
        if checker is None or not checker.wanted(hidden.shape[1]):
            return
        if await checker.caught(self.model_id, hop, hidden, out, forward_call=self._forward_call):
            raise WrongActivationsError(
                f"peer {hop.peer_id} returned wrong activations for blocks {hop.start}:{hop.end}"
            )

    async def backward_traced(
        self,
        trace: list[TracedHop],
        grad_output: torch.Tensor,
        budget: _RetryBudget | None = None,
        extras: SpanTensors | None = None,
        extra_grads: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """grad_output [B, S, D] with respect to the last hop's output -> gradient with respect to the first input.

        With ``extras``, each hop's gradients for its rows of them are written into ``extra_grads`` (tensors
        shaped like ``extras.tensors``, given zeroed by the caller).
        """
        budget = budget or _RetryBudget(self.client.config.max_retries)
        grad = grad_output
        for traced in reversed(trace):
            grad = await self._backward_hop(traced, grad, budget, extras, extra_grads)
        return grad

    async def _backward_hop(
        self,
        traced: TracedHop,
        grad: torch.Tensor,
        budget: _RetryBudget,
        extras: SpanTensors | None,
        extra_grads: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        hop = traced.hop
        try:
            grad_input, grads = await self._backward_call(
                self.client, self.model_id, hop, traced.hidden, grad, self._rows(extras, hop), **self._adapter_kwargs()
            )
        except SwarmError as e:
            budget.spend(e)
            self._log_failover("backward", hop, e)
            self.client.bans.ban(hop.peer_id)
        else:
            if extra_grads is not None:
                lo, hi = hop.start - self.start, hop.end - self.start
                for total, part in zip(extra_grads, grads, strict=True):
                    total[lo:hi] += part.to(total.dtype)
            return grad_input
        # The replacement route may split the span: recompute the inputs of its hops, then go back through them.
        _, sub_trace = await self.forward_traced(traced.hidden, hop.start, hop.end, budget, extras)
        return await self.backward_traced(sub_trace, grad, budget, extras, extra_grads)

    async def _route(self, start: int, end: int, fresh: bool = False) -> list[Hop]:
        if self.adapter is None:
            return await self.client.route(self.model_id, start, end, fresh=fresh)
        return await self.client.route(self.model_id, start, end, fresh=fresh, adapter=self.adapter)

    def _adapter_kwargs(self) -> dict[str, str]:
        """Only calls for an adapter pass one (transport fakes need not know about adapters)."""
        return {"adapter": self.adapter} if self.adapter is not None else {}

    def _rows(self, extras: SpanTensors | None, hop: Hop) -> SpanTensors | None:
        """The rows of ``extras`` (which cover blocks [self.start, self.end)) for the blocks of ``hop``."""
        return None if extras is None else extras.slice(hop.start - self.start, hop.end - self.start)

    def _log_failover(self, direction: str, hop: Hop, error: SwarmError) -> None:
        logger.warning(
            "%s on peer %s blocks %d:%d of %s failed (%s); rerouting",
            direction, hop.peer_id, hop.start, hop.end, self.model_id, error,
        )  # fmt: skip


class _RemoteBlocksFunction(torch.autograd.Function):
    """Autograd glue: the remote chain is one node of the local graph."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, blocks: RemoteBlocks, spec: Any, *tensors: torch.Tensor
    ) -> torch.Tensor:
        extras = SpanTensors(spec, tensors).detached() if spec is not None else None
        out, trace = blocks.run(blocks.forward_traced(hidden.detach(), extras=extras))
        ctx.blocks = blocks
        ctx.trace = trace  # detached inputs, one per hop: not saved tensors of the graph, so plain attributes
        ctx.extras = extras
        ctx.input_dtype = hidden.dtype
        return out.to(hidden.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        blocks: RemoteBlocks = ctx.blocks
        extras: SpanTensors | None = ctx.extras
        extra_grads = [torch.zeros_like(t) for t in extras.tensors] if extras is not None else []
        grad_input = blocks.run(
            blocks.backward_traced(ctx.trace, grad_output.contiguous(), extras=extras, extra_grads=extra_grads)
        )
        return (grad_input.to(ctx.input_dtype), None, None, *extra_grads)
