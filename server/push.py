"""Sending a span's output to the next server of the route (``rpc_push``), with a short deadline.

A failed push is not an error of the step: the client sees ``pushed=False`` and sends the input itself.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from swarm.auth import SwarmSecret
from swarm.messages import PushRequest, PushTarget, RpcResult
from swarm.service import BlockService

logger = logging.getLogger(__name__)

_FAILURES = (P2PHandlerError, P2PDaemonError, ConnectionError, OSError, EOFError, asyncio.IncompleteReadError)


@dataclass
class PushStats:
    sent: int = 0
    failed: int = 0
    inputs_pushed: int = 0
    inputs_filled: int = 0


class Pusher:
    """Pushes outputs from this server (``peer_id``) to others over its own p2p connection."""

    def __init__(self, p2p: P2P, peer_id: str, timeout_s: float, secret: SwarmSecret | None = None):
        self.p2p = p2p
        self.peer_id = peer_id
        self.timeout_s = timeout_s
        self.secret = secret

    async def push(self, target: PushTarget, meta: PushRequest, hidden: runtime_pb2.Tensor) -> bool:
        """True once ``target`` took the tensor; False (logged) if it refused or could not be reached in time."""
        if self.secret is not None:
            meta = meta.model_copy(update={"auth": self.secret.prove(self.peer_id, target.peer_id)})
        request = runtime_pb2.ExpertRequest(tensors=[hidden], metadata=meta.encode())
        try:
            stub = BlockService.get_stub(self.p2p, PeerID.from_base58(target.peer_id))
            response = await asyncio.wait_for(stub.rpc_push(request), self.timeout_s)
            result = RpcResult.decode(response.metadata)
        except (TimeoutError, *_FAILURES) as e:
            logger.info("push of step %d to %s failed: %s", meta.seq, target.peer_id[-8:], e or type(e).__name__)
            return False
        except Exception as e:  # a malformed peer id or answer is the other server's problem; the client fills the step
            logger.warning("push of step %d to %s got a bad answer: %s", meta.seq, target.peer_id[-8:], e)
            return False
        if result.error is not None:
            logger.info("push of step %d to %s refused: %s", meta.seq, target.peer_id[-8:], result.error.message)
            return False
        return True
