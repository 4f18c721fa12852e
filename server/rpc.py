"""The block server's RPC handlers: parse and validate requests, call the backend, translate errors once.

Every failure a peer can cause becomes a structured ``ErrorPayload`` in the response; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from server.backend import SpanBackend
from server.metrics import ServerMetrics
from server.push import Pusher, PushStats
from server.push_inbox import Mailbox, MailboxKey, Pushed, PushInbox
from server.sessions import Session, SessionRegistry
from server.settings import ServerSettings
from server.stream_reader import RequestReader
from server.validation import check_hidden, check_span, check_tuning, decode_tensors
from swarm import PROTOCOL_VERSION
from swarm.auth import SwarmSecret
from swarm.errors import (
    BadRequestError,
    ErrorPayload,
    ProtocolMismatchError,
    ServerLeavingError,
    SessionError,
    SwarmError,
)
from swarm.messages import (
    ForwardRequest,
    InferenceStep,
    OpenSession,
    PushRequest,
    PushTarget,
    RpcResult,
    ServerInfoResult,
    StepResult,
    TuningSpec,
)
from swarm.tensors import Compression, encode

logger = logging.getLogger(__name__)

_INTERNAL = ErrorPayload(code="internal_error", message="the server failed to process the request", retryable=True)


@dataclass
class ServingState:
    """What handlers need to know about the server they run in."""

    model_id: str
    start: int
    end: int
    hidden_size: int
    max_length: int
    version: str = ""


class BlockHandler:
    """Implements swarm.service.BlockService; registered with ``add_p2p_handlers(p2p, wrapper=handler)``."""

    def __init__(
        self,
        state: ServingState,
        backend: SpanBackend,
        sessions: SessionRegistry,
        settings: ServerSettings,
        metrics: ServerMetrics | None = None,
        *,
        peer_id: str = "",
        secret: SwarmSecret | None = None,
    ):
        self.state = state
        self.backend = backend
        self.sessions = sessions
        self.settings = settings
        self.metrics = metrics or ServerMetrics()
        self.peer_id = peer_id
        self.secret = secret
        """A private swarm's secret: every session and unary call must prove it (rpc_info stays open: it tells
        no more than the DHT record does)."""
        self.inbox = PushInbox()
        self.pusher: Pusher | None = None
        """Set once the server's p2p is up (``attach``); None: outputs are never pushed."""
        self.push_stats = PushStats()
        self._pushes: set[asyncio.Task] = set()
        self.leaving = asyncio.Event()
        """Set on graceful shutdown or a move: open sessions are told to fail over, new ones are refused."""

    def attach(self, pusher: Pusher) -> None:
        self.pusher = pusher

    def host(self, state: ServingState, backend: SpanBackend, sessions: SessionRegistry) -> None:
        """Serve another span (after a rebalancing move) and take sessions again."""
        self.state, self.backend, self.sessions = state, backend, sessions
        self.leaving.clear()

    # --- inference -------------------------------------------------------------------------------------------
    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        peer = str(context.remote_id)
        session: Session | None = None
        mailbox: Mailbox | None = None
        # The server may move to other blocks meanwhile: close the session where it was opened.
        registry, backend = self.sessions, self.backend
        compression: Compression = "none"
        reader = RequestReader(requests, self.leaving)
        try:
            while True:
                try:
                    request = await self._next_request(reader)
                    step = InferenceStep.decode(request.metadata)
                    tensors = list(request.tensors)
                    if session is None:
                        session = await self._open(step.open, peer, tensors[1:])
                        assert step.open is not None  # _open refuses a first message without it
                        mailbox = self.inbox.open((peer, step.open.session_id, step.open.start), session.batch_size)
                        compression = step.open.compression
                        tensors = tensors[:1]  # the rest were the session's tuning tensors
                    assert mailbox is not None
                    if step.fill:
                        if step.seq <= mailbox.taken:
                            continue  # the push won the race; this copy of the input is late
                        raise SessionError(f"step {step.seq} was filled but never announced as pushed")
                    hidden, filled = await self._input(step, tensors, mailbox, reader)
                    response = await self._step(session, step, hidden, compression, mailbox.key, filled)
                except StopAsyncIteration:
                    return
                except SwarmError as e:
                    logger.info("inference from %s refused: %s", peer[-8:], e)
                    self.metrics.observe_error(e.code)
                    yield _step_error(e.to_payload())
                    return
                except Exception:
                    logger.exception("inference step from %s failed", peer[-8:])
                    self.metrics.observe_error(_INTERNAL.code)
                    yield _step_error(_INTERNAL)
                    return
                yield response
        finally:
            reader.cancel()
            if mailbox is not None:
                self.inbox.close(mailbox)
            if session is not None:
                registry.close(session)
                backend.forget(session.session_id)

    async def _next_request(
        self, reader: RequestReader, also: asyncio.Future | None = None
    ) -> runtime_pb2.ExpertRequest | None:
        """The next request (None once ``also`` is done first); SessionError when the client is idle too long."""
        try:
            return await reader.next(self.settings.session_idle_timeout_s, also)
        except TimeoutError:
            raise SessionError("session closed: idle for too long") from None

    async def _input(
        self, step: InferenceStep, tensors: list, mailbox: Mailbox, reader: RequestReader
    ) -> tuple[torch.Tensor, bool]:
        """The step's hidden states [B, S, D] (carried by the request's ``tensors``, or pushed, or filled by the
        client) and whether a pushed step was filled."""
        if not step.pushed:
            (hidden,) = decode_tensors(tensors, 1)
            return hidden, False
        if tensors:
            raise BadRequestError("a pushed step carries no tensors")
        if step.seq <= mailbox.taken:
            raise BadRequestError(f"step {step.seq} is not after the last step {mailbox.taken}")
        pushed = mailbox.receive(step.seq)
        try:
            fill = await self._next_request(reader, also=pushed)
        finally:
            pushed.cancel()  # no-op once done; otherwise stops waiting for it
        if fill is None:
            got = pushed.result()
            if got.position != step.position:
                raise BadRequestError(f"pushed input is for position {got.position}, the step is at {step.position}")
            self.push_stats.inputs_pushed += 1
            self.metrics.observe_push("received")
            return got.hidden, False
        fill_step = InferenceStep.decode(fill.metadata)
        if not fill_step.fill or fill_step.seq != step.seq:
            raise SessionError(f"step {step.seq} waits for its pushed input; the client sent another step")
        (hidden,) = decode_tensors(fill.tensors, 1)
        mailbox.give_up(step.seq)
        self.push_stats.inputs_filled += 1
        self.metrics.observe_push("filled")
        return hidden, True

    async def _open(self, open_msg: OpenSession | None, peer: str, tuning_tensors: list) -> Session:
        if open_msg is None:
            raise SessionError("the first message of an inference stream must open a session")
        self._check_span_request(open_msg, peer)
        spec = open_msg.tuning
        extras = decode_tensors(tuning_tensors, spec.num_tensors if spec is not None else 0)
        if spec is not None:
            self._check_tuning(spec, extras, open_msg.end - open_msg.start, open_msg.adapter)
        if self.leaving.is_set():
            raise ServerLeavingError("this server is leaving the swarm and takes no new sessions")
        if open_msg.max_length > self.state.max_length:
            raise BadRequestError(
                f"max_length {open_msg.max_length} exceeds this server's limit {self.state.max_length}"
            )
        if open_msg.batch_size * open_msg.max_length > self.settings.max_session_length * 4:
            raise BadRequestError(f"batch {open_msg.batch_size} x length {open_msg.max_length} is too large")
        # Waits up to --alloc-timeout-s for cache pages, then refuses with the retryable ServerBusyError.
        session = await self.sessions.open(
            open_msg.session_id, peer, open_msg.start, open_msg.end, open_msg.batch_size, open_msg.max_length
        )
        session.tuning = self.backend.session_tuning(spec, extras, open_msg.adapter, open_msg.start, open_msg.end)
        return session

    async def _step(
        self,
        session: Session,
        step: InferenceStep,
        hidden: torch.Tensor,
        compression: Compression,
        key: MailboxKey,
        filled: bool = False,
    ) -> runtime_pb2.ExpertResponse:
        check_hidden(hidden, self.state.hidden_size, self.settings.max_step_tokens, session.batch_size)
        if step.position > session.length:
            raise BadRequestError(f"step position {step.position} is past the session's length {session.length}")
        if step.position + hidden.shape[1] > session.max_length:
            raise BadRequestError(
                f"step reaches {step.position + hidden.shape[1]} tokens, "
                f"over the session's max_length {session.max_length}"
            )
        if step.push_to is not None and step.seq <= 0:
            raise BadRequestError("a step that asks for a push needs a positive seq")
        began = time.perf_counter()
        out = await self.backend.inference_step(session, hidden, step.position)
        self.metrics.observe_step("inference", hidden.shape[0], hidden.shape[1], time.perf_counter() - began)
        encoded = encode(out, compression)
        if step.push_to is not None and self.pusher is not None:
            client_peer, session_id, _ = key
            meta = PushRequest(
                session_id=session_id, client_peer_id=client_peer, start=step.push_to.start, seq=step.seq,
                position=step.position,
            )  # fmt: skip
            # The push runs in the background: waiting for the next server's acknowledgement would hold this
            # answer (and the client) while that server computes. A lost push costs the client a fill.
            task = asyncio.create_task(self._push(step.push_to, meta, encoded))
            self._pushes.add(task)
            task.add_done_callback(self._pushes.discard)
            await asyncio.sleep(0)  # let the push leave first: it is on the route's critical path
        result = StepResult(step_id=step.step_id, position=session.length, filled=filled)
        return runtime_pb2.ExpertResponse(tensors=[encoded], metadata=result.encode())

    async def _push(self, target: PushTarget, meta: PushRequest, hidden: runtime_pb2.Tensor) -> None:
        assert self.pusher is not None
        pushed = await self.pusher.push(target, meta, hidden)
        self.metrics.observe_push("sent" if pushed else "failed")
        if pushed:
            self.push_stats.sent += 1
        else:
            self.push_stats.failed += 1

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        sender = str(context.remote_id)
        try:
            meta = PushRequest.decode(request.metadata)
            if self.secret is not None:
                self.secret.check(meta.auth, sender, self.peer_id)
            if meta.protocol_version != PROTOCOL_VERSION:
                raise ProtocolMismatchError(
                    f"pusher speaks protocol {meta.protocol_version}, this server speaks {PROTOCOL_VERSION}"
                )
            if not self.settings.accept_push:
                raise BadRequestError("this server does not take pushed inputs (--accept-push false)")
            mailbox = self.inbox.mailbox((meta.client_peer_id, meta.session_id, meta.start))
            (hidden,) = decode_tensors(request.tensors, 1)
            check_hidden(hidden, self.state.hidden_size, self.settings.max_step_tokens, mailbox.batch_size)
            mailbox.deliver(meta.seq, Pushed(meta.position, hidden, sender))
            return runtime_pb2.ExpertResponse(metadata=RpcResult().encode())
        except SwarmError as e:
            logger.info("push from %s refused: %s", sender[-8:], e)
            self.metrics.observe_error(e.code)
            return runtime_pb2.ExpertResponse(metadata=RpcResult(error=e.to_payload()).encode())
        except Exception:
            logger.exception("push from %s failed", sender[-8:])
            self.metrics.observe_error(_INTERNAL.code)
            return runtime_pb2.ExpertResponse(metadata=RpcResult(error=_INTERNAL).encode())

    # --- stateless ---------------------------------------------------------------------------------------------
    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary(request, context, expected_tensors=1)

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        return await self._unary(request, context, expected_tensors=2)

    async def _unary(self, request, context: P2PContext, expected_tensors: int) -> runtime_pb2.ExpertResponse:
        try:
            meta = ForwardRequest.decode(request.metadata)
            self._check_span_request(meta, str(context.remote_id))
            spec = meta.tuning
            tensors = decode_tensors(request.tensors, expected_tensors + (spec.num_tensors if spec else 0))
            tensors, extras = tensors[:expected_tensors], tensors[expected_tensors:]
            for tensor in tensors:
                check_hidden(tensor, self.state.hidden_size, self.settings.max_step_tokens)
            if spec is not None:
                self._check_tuning(spec, extras, meta.end - meta.start, meta.adapter)
            began = time.perf_counter()
            span = (meta.start, meta.end)
            if expected_tensors == 1:
                outs = [await self.backend.forward(tensors[0], *span, spec, extras, meta.adapter)]
            else:
                if tensors[0].shape != tensors[1].shape:
                    raise BadRequestError("grad_output must have the shape of the hidden states")
                outs = await self.backend.backward(tensors[0], tensors[1], *span, spec, extras, meta.adapter)
            kind = "forward" if expected_tensors == 1 else "backward"
            self.metrics.observe_step(kind, tensors[0].shape[0], tensors[0].shape[1], time.perf_counter() - began)
            # Activations (and their gradient) as the client asked; gradients of trainables always exact.
            encoded = [encode(outs[0], meta.compression)] + [encode(g) for g in outs[1:]]
            return runtime_pb2.ExpertResponse(tensors=encoded, metadata=RpcResult().encode())
        except SwarmError as e:
            logger.info("request from %s refused: %s", str(context.remote_id)[-8:], e)
            self.metrics.observe_error(e.code)
            return runtime_pb2.ExpertResponse(metadata=RpcResult(error=e.to_payload()).encode())
        except Exception:
            logger.exception("request from %s failed", str(context.remote_id)[-8:])
            self.metrics.observe_error(_INTERNAL.code)
            return runtime_pb2.ExpertResponse(metadata=RpcResult(error=_INTERNAL).encode())

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        info = ServerInfoResult(
            version=self.state.version,
            model_id=self.state.model_id,
            start=self.state.start,
            end=self.state.end,
            cache_tokens_left=self.sessions.tokens_left(self.state.end - self.state.start),
            active_sessions=len(self.sessions.sessions),
            max_batch_sessions_seen=self.backend.stats.max_sessions,
            max_batch_rows_seen=self.backend.stats.max_rows,
            batched_steps=self.backend.stats.batched_steps,
            batches_run=self.backend.stats.batches,
            steps_run=self.backend.stats.steps,
            batch_compute_s=self.backend.stats.compute_s,
            pushes_sent=self.push_stats.sent,
            pushes_failed=self.push_stats.failed,
            inputs_pushed=self.push_stats.inputs_pushed,
            inputs_filled=self.push_stats.inputs_filled,
        )
        return runtime_pb2.ExpertResponse(metadata=info.encode())

    def _check_tuning(self, spec: TuningSpec, extras: list, num_blocks: int, adapter: str | None) -> None:
        if adapter is not None and spec.lora is not None:
            raise BadRequestError("a request may carry its own LoRA factors or name an adapter, not both")
        span = self.backend.span
        check_tuning(
            spec, extras, num_blocks, span.spec, span.lora_targets,
            self.settings.max_prompt_tokens, self.settings.max_lora_rank,
        )  # fmt: skip

    def _check_span_request(self, meta: ForwardRequest | OpenSession, peer: str) -> None:
        if self.secret is not None:
            self.secret.check(meta.auth, peer, self.peer_id)
        meta.check_version()
        if meta.model_id != self.state.model_id:
            raise BadRequestError(f"this server serves {self.state.model_id!r}, not {meta.model_id!r}")
        check_span(meta.start, meta.end, self.state.start, self.state.end)
        if meta.adapter is not None and meta.adapter not in self.backend.adapters:
            served = ", ".join(sorted(self.backend.adapters)) or "none"
            raise BadRequestError(f"this server does not serve adapter {meta.adapter!r} (it serves: {served})")


def _step_error(payload: ErrorPayload) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=StepResult(error=payload).encode())
