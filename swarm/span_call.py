"""Calls to one server span: unary forward/backward/info and the per-hop inference stream.

Transport failures become ``PeerUnreachableError`` and error payloads become typed ``RemoteError``s here,
exactly once; callers above see only ``swarm.errors``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING

import torch
from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from swarm.auth import RpcProof
from swarm.errors import PeerUnreachableError, SwarmError, error_from_payload
from swarm.messages import ForwardRequest, InferenceStep, OpenSession, PushTarget, RpcResult, StepResult
from swarm.routing import Hop
from swarm.service import BlockService
from swarm.span_tensors import SpanTensors
from swarm.tensors import decode, encode

if TYPE_CHECKING:
    from swarm.client import SwarmClient

logger = logging.getLogger(__name__)

MIN_FILL_AFTER_S = 0.02
FILL_AFTER_FACTOR = 4.0

_TRANSPORT_ERRORS = (
    P2PHandlerError,
    P2PDaemonError,
    ConnectionError,
    OSError,
    EOFError,
    asyncio.IncompleteReadError,
)


async def call_forward(
    client: SwarmClient,
    model_id: str,
    hop: Hop,
    hidden: torch.Tensor,
    extras: SpanTensors | None = None,
    adapter: str | None = None,
) -> torch.Tensor:
    """hidden [B, S, D] through the hop's blocks (with ``extras``: the hop's rows of per-block trainables; with
    ``adapter``: a LoRA adapter the server serves by name)."""
    meta = _forward_request(client, model_id, hop, extras, adapter)
    request = runtime_pb2.ExpertRequest(tensors=_encode_all(client, [hidden], extras), metadata=meta.encode())
    response = await _unary(client, hop, "rpc_forward", request)
    return decode(response.tensors[0]).to(hidden.dtype)


async def call_backward(
    client: SwarmClient,
    model_id: str,
    hop: Hop,
    hidden: torch.Tensor,
    grad_output: torch.Tensor,
    extras: SpanTensors | None = None,
    adapter: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """-> (gradient for ``hidden``, gradients for ``extras``' tensors in their order)."""
    meta = _forward_request(client, model_id, hop, extras, adapter)
    tensors = _encode_all(client, [hidden, grad_output], extras)
    request = runtime_pb2.ExpertRequest(tensors=tensors, metadata=meta.encode())
    response = await _unary(client, hop, "rpc_backward", request)
    expected = 1 + (len(extras.tensors) if extras is not None else 0)
    if len(response.tensors) != expected:
        raise PeerUnreachableError(f"peer {hop.peer_id} sent {len(response.tensors)} gradients, not {expected}")
    grads = [decode(t) for t in response.tensors]
    extra_grads = [g.to(t.dtype) for g, t in zip(grads[1:], extras.tensors, strict=True)] if extras else []
    return grads[0].to(hidden.dtype), extra_grads


def _forward_request(
    client: SwarmClient, model_id: str, hop: Hop, extras: SpanTensors | None, adapter: str | None
) -> ForwardRequest:
    return ForwardRequest(
        adapter=adapter,
        model_id=model_id,
        start=hop.start,
        end=hop.end,
        auth=prove(client, hop),
        compression=client.config.compression,
        tuning=extras.spec if extras is not None else None,
    )


def _encode_all(
    client: SwarmClient, activations: list[torch.Tensor], extras: SpanTensors | None
) -> list[runtime_pb2.Tensor]:
    """Activations travel compressed as configured; trainables always exactly (small, and training needs them exact)."""
    compression = client.config.compression
    encoded = [encode(t, compression) for t in activations]
    return encoded + [encode(t) for t in (extras.tensors if extras is not None else ())]


def prove(client: SwarmClient, hop: Hop) -> RpcProof | None:
    """The proof of the swarm secret for a request to ``hop`` (None in a public swarm)."""
    secret = client.secret
    return secret.prove(client.peer_id, hop.peer_id) if secret is not None else None


async def _unary(client: SwarmClient, hop: Hop, method: str, request) -> runtime_pb2.ExpertResponse:
    stub = BlockService.get_stub(client.p2p, client.peer(hop.peer_id))
    try:
        response = await getattr(stub, method)(request, timeout=client.config.step_timeout_s)
    except TimeoutError:
        raise PeerUnreachableError(f"peer {hop.peer_id} did not answer {method} in time") from None
    except _TRANSPORT_ERRORS as e:
        raise PeerUnreachableError(f"peer {hop.peer_id} failed {method}: {e}") from None
    result = RpcResult.decode(response.metadata)
    if result.error is not None:
        raise error_from_payload(result.error, hop.peer_id)
    if not response.tensors:
        raise PeerUnreachableError(f"peer {hop.peer_id} sent an empty {method} response")
    return response


class SpanStream:
    """One open inference stream to one server for blocks [hop.start, hop.end)."""

    def __init__(self, client: SwarmClient, hop: Hop, open_msg: OpenSession, extras: SpanTensors | None = None):
        self.hop = hop
        self._extras = extras
        """The hop's rows of per-block trainables; they travel once, with the opening step (``open_msg.tuning``)."""
        self._client = client
        self._open_msg: OpenSession | None = open_msg
        self._requests: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._connecting: asyncio.Future[AsyncIterator[runtime_pb2.ExpertResponse]] | None = None
        self._responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self._step_id = 0
        self._decode_s: float | None = None  # moving average of this stream's single-token step time
        self._pushed_s: float | None = None  # the same for pushed steps, from the previous span's answer
        self.closed = False
        self.answered = 0
        """Steps this server has answered on this stream (0: it may not even have opened the session yet)."""

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Send hidden [B, S, D] for positions [position, position + S); return the span's output."""
        await self.send(hidden, position)
        out, _ = await self.receive(hidden.shape[1], hidden.dtype)
        return out

    async def send(
        self,
        hidden: torch.Tensor | None,
        position: int,
        *,
        seq: int = 0,
        push_to: PushTarget | None = None,
        fill: bool = False,
    ) -> None:
        """Queue one step: hidden [B, S, D] for positions [position, position + S), or (None) a step whose input
        is pushed by the previous server; ``fill`` sends the input of pushed step ``seq`` after all. Failures
        show in ``receive``."""
        if self.closed:
            return
        if not fill:
            self._step_id += 1
        open_msg = self._open_msg
        if open_msg is not None and self._client.secret is not None:
            open_msg = open_msg.model_copy(update={"auth": prove(self._client, self.hop)})
        meta = InferenceStep(
            open=open_msg, position=position, step_id=self._step_id, seq=seq, push_to=push_to,
            pushed=hidden is None, fill=fill,
        )  # fmt: skip
        tensors = [] if hidden is None else [encode(hidden, self._client.config.compression)]
        if open_msg is not None and self._extras is not None:
            tensors += [encode(t) for t in self._extras.tensors]  # the session's tuning, sent once
        self._open_msg = None
        request = runtime_pb2.ExpertRequest(tensors=tensors, metadata=meta.encode())
        self._client.wire_bytes_sent += request.ByteSize()
        await self._requests.put(request)
        if self._connecting is None:
            # Opened in the background, so that the streams of every span of a step open at the same time.
            stub = BlockService.get_stub(self._client.p2p, self._client.peer(self.hop.peer_id))
            self._connecting = asyncio.ensure_future(stub.rpc_inference(self._iterate_requests()))

    async def receive(
        self, length: int, dtype: torch.dtype, fill: Callable[[], Awaitable[None]] | None = None
    ) -> tuple[torch.Tensor, bool]:
        """The output [B, length, D] of the oldest unanswered step, and whether its (pushed) input was filled.

        For a pushed step, ``fill`` sends the input from the client when no answer came within ``fill_after``.
        """
        if self.closed or self._connecting is None:
            raise PeerUnreachableError(f"stream to peer {self.hop.peer_id} is closed")
        timeout = self._step_timeout(length)
        began = time.perf_counter()
        try:
            if self._responses is None:
                self._responses = await asyncio.wait_for(self._connecting, self._client.config.connect_timeout_s)
            answer = asyncio.ensure_future(anext(self._responses))
            if fill is not None:
                await asyncio.wait({answer}, timeout=self._fill_after(length))
                if not answer.done():
                    await fill()
            response = await asyncio.wait_for(answer, max(timeout - (time.perf_counter() - began), 0.0))
            self._client.wire_bytes_received += response.ByteSize()
        except (TimeoutError, StopAsyncIteration) as e:
            await self.close()
            what = "timed out" if isinstance(e, asyncio.TimeoutError) else "closed the stream"
            raise PeerUnreachableError(
                f"peer {self.hop.peer_id} {what} (blocks {self.hop.start}:{self.hop.end})"
            ) from None
        except _TRANSPORT_ERRORS as e:
            await self.close()
            raise PeerUnreachableError(f"peer {self.hop.peer_id} failed: {e}") from None
        result = StepResult.decode(response.metadata)
        if result.error is not None:
            await self.close()
            raise error_from_payload(result.error, self.hop.peer_id)
        if not response.tensors:
            await self.close()
            raise PeerUnreachableError(f"peer {self.hop.peer_id} sent an empty step response")
        if length == 1:
            elapsed = time.perf_counter() - began
            self._decode_s = elapsed if self._decode_s is None else 0.8 * self._decode_s + 0.2 * elapsed
            self._client.throughputs.observe(self.hop.peer_id, self.hop.end - self.hop.start, elapsed)
            if fill is not None and not result.filled:
                self._pushed_s = elapsed if self._pushed_s is None else 0.8 * self._pushed_s + 0.2 * elapsed
        self.answered += 1
        return decode(response.tensors[0]).to(dtype), result.filled

    def _fill_after(self, length: int) -> float:
        """How long to wait for a pushed step's answer before sending its input: a few times what pushed decode
        steps of this server took (counted from the previous span's answer); prefills and first steps wait
        ``push_fill_s``."""
        config = self._client.config
        if length > 1 or self._pushed_s is None:
            return config.push_fill_s
        return min(config.push_fill_s, max(MIN_FILL_AFTER_S, FILL_AFTER_FACTOR * self._pushed_s))

    def _step_timeout(self, length: int) -> float:
        """A dead server often shows only as silence, so a decode step that takes far longer than this server's
        recent decode steps counts as a failure; prefills and first steps get the full configured timeout."""
        config = self._client.config
        if length > 1 or self._decode_s is None:
            return config.step_timeout_s
        return min(config.step_timeout_s, max(config.min_step_timeout_s, config.step_timeout_factor * self._decode_s))

    async def _iterate_requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            request = await self._requests.get()
            if request is None:
                return
            yield request

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self._requests.put(None)
        if self._responses is None and self._connecting is not None:
            if self._connecting.done() and not self._connecting.cancelled() and not self._connecting.exception():
                self._responses = self._connecting.result()
            else:
                self._connecting.cancel()
        if self._responses is not None:
            # Drain the end of the stream so the server sees a clean close; never wait long for it.
            with suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(self._drain(), 1.0)

    async def _drain(self) -> None:
        assert self._responses is not None
        async for _ in self._responses:
            pass


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, SwarmError) and error.retryable
