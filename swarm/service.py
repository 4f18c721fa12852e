"""The block server's RPC contract over hivemind p2p: method names and protobuf types.

Servers register an implementation with ``BlockService().add_p2p_handlers(p2p, wrapper=impl)``; clients call
``BlockService.get_stub(p2p, peer_id)``. Handle names derive from this class's name, so both sides use it.
"""

from __future__ import annotations

from typing import AsyncIterator  # hivemind's servicer recognises typing.AsyncIterator only  # noqa: UP035

from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2


class BlockService(ServicerBase):
    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Stateful session: each request is an ``InferenceStep``, each response a ``StepResult``."""
        raise NotImplementedError
        yield  # pragma: no cover

    async def rpc_forward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Stateless forward over a span: ``ForwardRequest`` -> ``RpcResult``."""
        raise NotImplementedError

    async def rpc_backward(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """Gradient w.r.t. a span's input: tensors [hidden, grad_output] -> [grad_input]."""
        raise NotImplementedError

    async def rpc_push(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """A previous server's output for a session's waiting step: ``PushRequest`` -> ``RpcResult``."""
        raise NotImplementedError

    async def rpc_info(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        """``ServerInfoResult``; also a latency probe."""
        raise NotImplementedError
