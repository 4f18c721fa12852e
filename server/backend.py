"""Compute for the hosted span: one compute thread batches inference steps across sessions and runs the rest.

Handlers run on the event loop and hand tensors to this thread, so the loop stays responsive (heartbeats,
other sessions' I/O) while the model computes. Inference steps wait in a queue; each time the thread is free it
takes everything pending (up to ``max_batch_tokens``, see ``server.batching``) and runs it as ONE packed
forward (``BlockSpan.forward_packed``). A lone step runs at once, through exactly the single-session path.
Stateless forward/backward calls take turns with the batches, one per turn.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import torch

from server.batching import BatchLimits, PendingStep, plan_batch
from server.model import BlockSpan
from server.model.span import SpanStep
from server.model.tuning import BlockLora, SpanTuning
from server.sessions import Session
from swarm.messages import TuningSpec

logger = logging.getLogger(__name__)


class BatchStats:
    """What the scheduler has done so far (read by rpc_info; written by the compute thread only)."""

    def __init__(self) -> None:
        self.batches = 0
        self.batched_steps = 0
        """Steps (chunks) that ran together with at least one other session's."""
        self.max_sessions = 0
        self.max_rows = 0
        self.steps = 0
        self.compute_s = 0.0

    def observe(self, sessions: int, rows: int, seconds: float) -> None:
        self.batches += 1
        self.steps += sessions
        self.compute_s += seconds
        if sessions > 1:
            self.batched_steps += sessions
        self.max_sessions = max(self.max_sessions, sessions)
        self.max_rows = max(self.max_rows, rows)


class SpanBackend:
    def __init__(
        self,
        span: BlockSpan,
        start: int,
        end: int,
        dtype: torch.dtype,
        device: torch.device,
        limits: BatchLimits | None = None,
        adapters: dict[str, list[BlockLora]] | None = None,
    ):
        self.span = span
        self.adapters = adapters or {}
        """Server-side LoRA adapters by name, one ``BlockLora`` per hosted block (``server.adapters``)."""
        self.start = start
        self.end = end
        self.dtype = dtype
        self.device = device
        self.limits = limits or BatchLimits()
        self.stats = BatchStats()
        self._pending: list[PendingStep] = []
        self._last_step: dict[str, float] = {}
        """Session id -> when its latest step arrived: who is decoding now (so worth waiting for)."""
        self._last_batch: frozenset[str] = frozenset()
        """Sessions of the batch that ran last: they are on their way through the rest of their route."""
        self._batch_of: dict[str, frozenset[str]] = {}
        """Session id -> the sessions of the batch it last ran in: its group, which comes back in step with it."""
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="compute", daemon=True)
        self._thread.start()

    @staticmethod
    def _blocks(start: int, end: int) -> slice:
        return slice(start, end)  # BlockSpan takes absolute model block indices

    # --- the event loop's side ---------------------------------------------------------------------------------
    async def inference_step(self, session: Session, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """hidden: [B, S, D] at ``position`` of ``session`` -> [B, S, D]; batched with other sessions' steps."""
        future: Future[torch.Tensor] = Future()
        step = PendingStep(session, hidden, position, future)
        with self._wake:
            self._check_running()
            self._pending.append(step)
            self._last_step[session.session_id] = time.monotonic()
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def forget(self, session_id: str) -> None:
        """The session has closed: batches stop waiting for its steps."""
        with self._wake:
            self._last_step.pop(session_id, None)
            self._batch_of.pop(session_id, None)

    async def forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        spec: TuningSpec | None = None,
        extras: list[torch.Tensor] | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        """``extras``: the request's per-block trainables as ``spec`` describes them (already validated);
        ``adapter``: the name of one of ``adapters``."""
        return await self._run(self._forward, hidden, start, end, spec, extras or [], adapter)

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        spec: TuningSpec | None = None,
        extras: list[torch.Tensor] | None = None,
        adapter: str | None = None,
    ) -> list[torch.Tensor]:
        """-> [gradient for ``hidden``, then one per tensor of ``extras``]."""
        return await self._run(self._backward, hidden, grad_output, start, end, spec, extras or [], adapter)

    def session_tuning(
        self, spec: TuningSpec | None, extras: list[torch.Tensor], adapter: str | None, start: int, end: int
    ) -> SpanTuning | None:
        """A session's (or request's) tuning for blocks [start, end), on the compute device."""
        return self._tuning(spec, [t.to(self.device, self.dtype) for t in extras], adapter, start, end)

    def _tuning(
        self, spec: TuningSpec | None, tensors: list[torch.Tensor], adapter: str | None, start: int, end: int
    ) -> SpanTuning | None:
        tuning = SpanTuning.from_tensors(spec, tensors) if spec is not None else None
        if adapter is None:
            return tuning
        rows = self.adapters[adapter][start - self.start : end - self.start]
        return (tuning or SpanTuning()).with_adapter(rows)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        future: Future[Any] = Future()
        with self._wake:
            self._check_running()
            self._calls.append((fn, args, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    def _check_running(self) -> None:
        if self._stopping:
            raise RuntimeError("the compute thread is shutting down")

    # --- the compute thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug here must fail the queued steps, not leave their sessions hanging
            logger.exception("the compute thread of blocks %d:%d died", self.start, self.end)
            with self._wake:
                self._stopping = True
                dropped = [st.future for st in self._pending] + [future for _, _, future in self._calls]
                self._pending.clear()
                self._calls.clear()
            for future in dropped:
                _fail(future, RuntimeError(f"the compute thread died: {e!r}"))

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not (self._pending or self._calls or self._stopping):
                    self._wake.wait()
                if not (self._pending or self._calls):
                    return  # stopping, and everything queued is done
                if self.limits.batch_wait_s > 0 and self._pending and not self._calls:
                    self._wait_for_company()
                call = self._calls.popleft() if self._calls else None
                self._pending = [st for st in self._pending if not st.future.cancelled()]
                plan = plan_batch(self._pending, self.limits)
            if call is not None:
                fn, args, future = call
                if future.set_running_or_notify_cancel():
                    _settle(future, fn, *args)
            if plan:
                self._run_batch(plan)

    def _wait_for_company(self) -> None:
        """Wait up to ``batch_wait_s`` for the other sessions decoding now to send their next steps.

        Expected are the recently active sessions that were not in the batch that just ran (those are still on
        the rest of their route, and waiting for them would wait a whole round), and the rest of the group that
        each pending session last ran with (a group comes back in step, so its first arrival does not leave
        alone and split it). The wait ends as soon as every expected session has a step pending (or the batch is
        full), so a lone session, or a group that already arrived together, never waits.
        """
        now = time.monotonic()
        deadline = now + self.limits.batch_wait_s
        horizon = now - max(1.0, 10 * self.limits.batch_wait_s)
        self._last_step = {sid: t for sid, t in self._last_step.items() if t >= horizon}
        self._batch_of = {sid: group for sid, group in self._batch_of.items() if sid in self._last_step}
        active = self._last_step.keys()
        while not self._stopping and self._pending_tokens() < self.limits.max_batch_tokens:
            pending = {st.session.session_id for st in self._pending}
            groups = frozenset().union(*(self._batch_of.get(sid, frozenset()) for sid in pending))
            if (active - self._last_batch) | (groups & active) <= pending:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)

    def _pending_tokens(self) -> int:
        return sum(st.rows * min(st.remaining, self.limits.prefill_chunk_tokens) for st in self._pending)

    def _run_batch(self, plan: list[tuple[PendingStep, int]]) -> None:
        rows = sum(st.rows for st, _ in plan)
        if len(plan) > max(1, self.stats.max_sessions):
            tokens = sum(take * st.rows for st, take in plan)
            logger.info("batched %d sessions in one forward (%d rows, %d tokens): a new high", len(plan), rows, tokens)
        began = time.perf_counter()
        try:
            with torch.inference_mode():
                inputs = _moved([st.hidden[:, st.done : st.done + take] for st, take in plan], self.device, self.dtype)
                steps = [
                    SpanStep(hidden, st.session.cache, st.position + st.done, st.session.tuning)
                    for hidden, (st, _) in zip(inputs, plan, strict=True)
                ]
                outputs = _moved(self.span.forward_packed(steps, self._blocks(*plan[0][0].blocks)), "cpu")
        except Exception as e:
            with self._wake:
                for st, _ in plan:
                    self._pending.remove(st)
            for st, _ in plan:
                _fail(st.future, e)
            return
        self.stats.observe(len(plan), rows, time.perf_counter() - began)
        self._last_batch = frozenset(st.session.session_id for st, _ in plan)
        self._batch_of.update(dict.fromkeys(self._last_batch, self._last_batch))
        finished = []
        for (st, take), out in zip(plan, outputs, strict=True):
            st.outputs.append(out)
            st.done += take
            if st.remaining == 0:
                finished.append(st)
        if finished:
            with self._wake:
                for st in finished:
                    self._pending.remove(st)
        for st in finished:
            st.session.length = st.position + st.hidden.shape[1]
            out = st.outputs[0] if len(st.outputs) == 1 else torch.cat(st.outputs, dim=1)  # [B, S, D]
            _resolve(st.future, out.to("cpu", st.hidden.dtype))

    def _forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        spec: TuningSpec | None = None,
        extras: list[torch.Tensor] | None = None,
        adapter: str | None = None,
    ) -> torch.Tensor:
        with torch.inference_mode():
            tuning = self.session_tuning(spec, extras or [], adapter, start, end)
            out = self.span(hidden.to(self.device, self.dtype), blocks=self._blocks(start, end), tuning=tuning)
            return out.to("cpu", hidden.dtype)

    def _backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        start: int,
        end: int,
        spec: TuningSpec | None,
        extras: list[torch.Tensor],
        adapter: str | None = None,
    ) -> list[torch.Tensor]:
        with torch.enable_grad():
            x = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            leaves = [t.to(self.device, self.dtype).detach().requires_grad_(True) for t in extras]
            tuning = self._tuning(spec, leaves, adapter, start, end)
            out = self.span(x, blocks=self._blocks(start, end), tuning=tuning)
            grads = torch.autograd.grad(out, [x, *leaves], grad_output.to(self.device, self.dtype), allow_unused=True)
            inputs = [hidden, *extras]
            return [
                (g if g is not None else torch.zeros_like(leaf)).to("cpu", original.dtype)
                for g, leaf, original in zip(grads, [x, *leaves], inputs, strict=True)
            ]

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
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()


def _moved(
    tensors: list[torch.Tensor], device: torch.device | str, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """A batch's tensors ([B_i, S_i, D] each) on ``device`` (in ``dtype``), as ONE copy when a GPU is on either
    side: each host-device copy waits for the GPU, so one per session added a wait per session."""
    device = torch.device(device)
    if len(tensors) == 1 or (device.type == "cpu" and tensors[0].device.type == "cpu"):
        return [x.to(device=device, dtype=dtype) for x in tensors]
    d = tensors[0].shape[-1]
    flat = torch.cat([x.reshape(-1, d) for x in tensors]).to(device=device, dtype=dtype)
    parts = flat.split([x.shape[0] * x.shape[1] for x in tensors])
    return [part.view(x.shape) for part, x in zip(parts, tensors, strict=True)]


def _settle(future: Future[Any], fn: Callable[..., Any], *args: Any) -> None:
    try:
        result = fn(*args)
    except BaseException as e:
        future.set_exception(e)
    else:
        future.set_result(result)


def _resolve(future: Future[Any], value: Any) -> None:
    try:
        future.set_result(value)
    except InvalidStateError:  # cancelled meanwhile: its handler is gone
        pass


def _fail(future: Future[Any], error: BaseException) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:
        pass
