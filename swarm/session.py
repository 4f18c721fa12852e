"""An inference session over a chain of spans that survives servers dying mid-generation.

Each span remembers the inputs it was sent. When a server fails with a retryable error (dead, hung, busy), the
session bans it, routes around exactly its blocks (possibly through several servers), rebuilds their caches by
replaying the remembered inputs, and retries the step. Greedy output is unchanged by a failover. A server that a
spot-check (``swarm.spot_check``) catches returning wrong activations fails over the same way, before its output
is used.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from swarm.errors import BadRequestError, SwarmError, WrongActivationsError
from swarm.messages import OpenSession, PushTarget
from swarm.routing import Hop
from swarm.span_call import SpanStream
from swarm.span_tensors import SpanTensors

if TYPE_CHECKING:
    from swarm.client import SwarmClient

logger = logging.getLogger(__name__)

MAX_FILLS_IN_A_ROW = 3
"""A span whose pushes keep failing (it refuses them, or the previous server cannot reach it) gets its inputs
from the client for the rest of the session, so a broken push path costs a few fill delays, not one per step."""


@dataclass
class _Span:
    stream: SpanStream
    inputs: list[torch.Tensor] = field(default_factory=list)
    """Inputs sent so far, in position order: chunks of [B, S_i, D] covering [0, session position)."""
    sent: bool = False
    """The current step is sent and not yet answered."""
    awaits_push: bool = False
    """The current step's input comes by push from the previous span's server (or, failing that, a fill)."""
    fills_in_a_row: int = 0
    """Pushed steps in a row whose input the client had to fill; at MAX_FILLS_IN_A_ROW, pushes to it stop."""
    checked: bool | None = None
    """The current step's output is spot-checked before it is used (None: not decided yet, as for a replacement
    span); a checked span pushes nothing, so a liar's output never reaches the next server."""

    @property
    def hop(self) -> Hop:
        return self.stream.hop

    def truncate(self, position: int) -> None:
        kept, total = [], 0
        for chunk in self.inputs:
            if total >= position:
                break
            take = min(chunk.shape[1], position - total)
            kept.append(chunk[:, :take])
            total += take
        self.inputs = kept


class InferenceSession:
    """Async context manager; ``step`` runs hidden states through every block with per-server KV caches."""

    def __init__(
        self,
        client: SwarmClient,
        model_id: str,
        max_length: int,
        batch_size: int = 1,
        extras: SpanTensors | None = None,
        adapter: str | None = None,
    ):
        self.client = client
        self.adapter = adapter
        """A LoRA adapter served by name: routes use only servers announcing it, each stream asks for it."""
        self.extras = extras.detached() if extras is not None else None
        """Per-block tensors for every block of the model (deep prompts, LoRA factors) that each server applies to
        every step; each span's stream sends its rows when it opens."""
        self.model_id = model_id
        self.max_length = max_length
        self.batch_size = batch_size
        self.session_id = uuid.uuid4().hex
        self.position = 0
        self.failovers = 0
        self.recovery_s: list[float] = []
        """Time each failover took from the failure being noticed to the replacement being ready."""
        self.fills = 0
        """Pushed steps whose input the client had to send itself (no push came in time)."""
        self._spans: list[_Span] = []
        self._seq = 0
        """Steps started in this session: the key that matches a pushed input to its step on every server."""
        self._closed = False

    async def __aenter__(self) -> InferenceSession:
        await self.open()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def open(self) -> None:
        route = await self.client.route(
            self.model_id, cache_tokens=self.batch_size * self.max_length, adapter=self.adapter
        )
        self._spans = [_Span(self._stream(hop)) for hop in route]
        logger.info(
            "session %s: model %s route %s",
            self.session_id[:8],
            self.model_id,
            " -> ".join(f"{h.peer_id[-6:]}[{h.start}:{h.end}]" for h in route),
        )

    @property
    def route(self) -> list[Hop]:
        return [span.hop for span in self._spans]

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """hidden: [B, S, D] for positions [position, position + S) -> [B, S, D] after the last block.

        ``position`` defaults to the session's current length; a smaller value rewinds (drops later tokens).
        """
        position = self.position if position is None else position
        if self._closed:
            raise BadRequestError("inference session is closed")
        if hidden.ndim != 3 or hidden.shape[0] != self.batch_size or hidden.shape[1] == 0:
            raise BadRequestError(f"expected hidden states [{self.batch_size}, S, D], got {list(hidden.shape)}")
        if not 0 <= position <= self.position:
            raise BadRequestError(f"position {position} is beyond the session's length {self.position}")
        if position + hidden.shape[1] > self.max_length:
            raise BadRequestError(
                f"step would reach {position + hidden.shape[1]} tokens, over the session's max_length {self.max_length}"
            )
        if position < self.position:
            for span in self._spans:
                span.truncate(position)
        self._seq += 1
        try:
            x = await self._run(hidden, position, self._seq)
        except BaseException:
            # A span left mid-step holds a half-done step: close it, so the next step fails it over and replays.
            for span in self._spans:
                if span.sent:
                    await span.stream.close()
            raise
        self.position = position + hidden.shape[1]
        return x

    async def _run(self, hidden: torch.Tensor, position: int, seq: int) -> torch.Tensor:
        """Run step ``seq`` through every span, with failover. With push, every span but the first is told up
        front that its input will come from the previous server; the client fills it only where no push came."""
        push = self.client.config.push and len(self._spans) > 1
        for index, span in enumerate(self._spans):
            span.sent = False
            span.checked = self._wants_check(position + hidden.shape[1])
            # A stream's first step opens the session there, so a push could arrive before it: not pushed.
            span.awaits_push = (
                push
                and index > 0
                and not self._spans[index - 1].checked
                and span.stream.answered > 0
                and span.hop.server.record.push
                and span.fills_in_a_row < MAX_FILLS_IN_A_ROW
            )
        for index, span in enumerate(self._spans):
            if span.awaits_push:
                await span.stream.send(None, position, seq=seq, push_to=self._push_target(index))
                span.sent = True
        x = hidden
        index, failures = 0, 0
        while index < len(self._spans):
            span = self._spans[index]
            try:
                if span.checked is None:  # a replacement after a failover: its step gets its own draw
                    span.checked = self._wants_check(position + x.shape[1])
                if not span.sent:
                    push_to = None if span.checked else self._push_target(index)
                    await span.stream.send(x, position, seq=seq, push_to=push_to)
                    span.sent = True
                fill = None
                if span.awaits_push:
                    fill = functools.partial(span.stream.send, x, position, seq=seq, fill=True)  # the client path
                out, filled = await span.stream.receive(x.shape[1], x.dtype, fill)
                if span.checked:
                    await self._spot_check(span, x, out)
            except SwarmError as e:
                failures += 1
                if not e.retryable or failures > self.client.config.max_retries:
                    raise
                try:
                    await self._replace(index, e, position)
                except SwarmError as replay_error:
                    # The old span stays (closed) in place, so the next pass fails over again.
                    if not replay_error.retryable:
                        raise
                    failures += 1
                continue
            span.sent = False
            if span.awaits_push:
                span.fills_in_a_row = span.fills_in_a_row + 1 if filled else 0
                self.fills += filled
            span.inputs.append(x)
            x = out
            index += 1
        return x

    def _wants_check(self, tokens: int) -> bool:
        """Whether to spot-check a span's step whose recomputation spans ``tokens`` positions."""
        if self.extras is not None or self.adapter is not None:
            return False  # checkers recompute the plain blocks; a tuned session's steps are not checked
        return self.client.spot_checker.wanted(tokens)

    async def _spot_check(self, span: _Span, x: torch.Tensor, out: torch.Tensor) -> None:
        """Raise ``WrongActivationsError`` (the span then fails over) if a spot-check caught the span's server:
        its output for ``x`` is recomputed statelessly elsewhere from the span's past inputs and ``x``."""
        history = torch.cat([*span.inputs, x], dim=1)  # [B, position + S, D]
        if await self.client.spot_checker.caught(self.model_id, span.hop, history, out):
            await span.stream.close()
            raise WrongActivationsError(
                f"peer {span.hop.peer_id} returned wrong activations for blocks {span.hop.start}:{span.hop.end}"
            )

    def _push_target(self, index: int) -> PushTarget | None:
        """Where span ``index`` should push its output: the next span, if that one waits for a push."""
        if index + 1 < len(self._spans) and self._spans[index + 1].awaits_push:
            hop = self._spans[index + 1].hop
            return PushTarget(peer_id=hop.peer_id, start=hop.start)
        return None

    async def _replace(self, index: int, error: SwarmError, position: int) -> None:
        """Swap span ``index`` for fresh servers covering the same blocks, replaying its inputs up to ``position``."""
        began = time.perf_counter()
        failed = self._spans[index]
        hop = failed.hop
        self.failovers += 1
        logger.warning(
            "session %s: peer %s (blocks %d:%d) failed: %s; failing over",
            self.session_id[:8],
            hop.peer_id,
            hop.start,
            hop.end,
            error,
        )
        self.client.bans.ban(hop.peer_id)
        await failed.stream.close()
        route = await self.client.route(
            self.model_id,
            hop.start,
            hop.end,
            fresh=True,
            cache_tokens=self.batch_size * self.max_length,
            adapter=self.adapter,
        )
        replacements = [_Span(self._stream(new_hop)) for new_hop in route]
        if position > 0:
            replay = torch.cat(failed.inputs, dim=1) if len(failed.inputs) > 1 else failed.inputs[0]
            replay = replay[:, :position]
            for span in replacements:
                try:
                    out = await span.stream.step(replay, 0)
                except SwarmError:
                    self.client.bans.ban(span.hop.peer_id)
                    for other in replacements:
                        await other.stream.close()
                    raise
                span.inputs = [replay]
                replay = out
        self._spans[index : index + 1] = replacements
        self.recovery_s.append(time.perf_counter() - began)
        logger.info(
            "session %s: blocks %d:%d now on %s",
            self.session_id[:8],
            hop.start,
            hop.end,
            ", ".join(f"{s.hop.peer_id[-6:]}[{s.hop.start}:{s.hop.end}]" for s in replacements),
        )

    def _stream(self, hop: Hop) -> SpanStream:
        open_msg = OpenSession(
            model_id=self.model_id,
            start=hop.start,
            end=hop.end,
            session_id=self.session_id,
            max_length=self.max_length,
            batch_size=self.batch_size,
            compression=self.client.config.compression,
            tuning=self.extras.spec if self.extras is not None else None,
            adapter=self.adapter,
        )
        extras = self.extras.slice(hop.start, hop.end) if self.extras is not None else None
        return SpanStream(self.client, hop, open_msg, extras)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for span in self._spans:
            await span.stream.close()
