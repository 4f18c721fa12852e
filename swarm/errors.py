"""The swarm's error tree.

    SwarmError                      base; every error that crosses a process boundary has a ``code``
    ├── MissingBlocksError          no online server covers some blocks (names them)          retryable
    ├── ModelNotFoundError          no server announces this model id
    ├── RemoteError                 a server answered with a structured error payload
    │   ├── BadRequestError         the request was malformed (shape, dtype, non-finite, length)
    │   ├── SessionError            unknown, closed or expired session
    │   ├── ServerBusyError         cache or session limits reached                            retryable
    │   ├── ServerLeavingError      the server is shutting down gracefully                     retryable
    │   ├── UnauthorizedError       a private server refused a caller without the swarm secret
    │   └── ProtocolMismatchError   the peer speaks another protocol version
    ├── PeerUnreachableError        the transport failed or timed out                          retryable
    └── WrongActivationsError       a spot-check caught the server returning wrong outputs     retryable

Servers raise these in handlers; ``server.rpc`` turns them into an ``ErrorPayload`` on the wire exactly once,
and ``swarm.client`` turns a payload back into the matching class with ``error_from_payload``.
"""

from __future__ import annotations

from pydantic import BaseModel


class ErrorPayload(BaseModel):
    """What travels in a response's metadata when a request fails."""

    code: str
    message: str
    retryable: bool = False


class SwarmError(Exception):
    code = "swarm_error"
    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_payload(self) -> ErrorPayload:
        return ErrorPayload(code=self.code, message=self.message, retryable=self.retryable)


class MissingBlocksError(SwarmError):
    code = "missing_blocks"
    retryable = True

    def __init__(self, model_id: str, missing: list[int]):
        self.model_id = model_id
        self.missing = missing
        super().__init__(f"no online server serves blocks {_ranges(missing)} of model {model_id!r}")


class ModelNotFoundError(SwarmError):
    code = "model_not_found"


class RemoteError(SwarmError):
    code = "remote_error"


class BadRequestError(RemoteError):
    code = "bad_request"


class SessionError(RemoteError):
    code = "session_error"


class ServerBusyError(RemoteError):
    code = "server_busy"
    retryable = True


class ServerLeavingError(RemoteError):
    code = "server_leaving"
    retryable = True


class UnauthorizedError(RemoteError):
    """A private swarm's server refused a request that carried no valid proof of the swarm secret."""

    code = "unauthorized"


class ProtocolMismatchError(RemoteError):
    code = "protocol_mismatch"


class PeerUnreachableError(SwarmError):
    code = "peer_unreachable"
    retryable = True


class WrongActivationsError(SwarmError):
    """Raised on the client only (``swarm.spot_check``): the span is redone on other servers."""

    code = "wrong_activations"
    retryable = True


_BY_CODE: dict[str, type[SwarmError]] = {
    cls.code: cls
    for cls in (
        RemoteError,
        BadRequestError,
        SessionError,
        ServerBusyError,
        ServerLeavingError,
        UnauthorizedError,
        ProtocolMismatchError,
    )
}


def error_from_payload(payload: ErrorPayload, peer: str | None = None) -> RemoteError:
    """Rebuild the typed error a server reported; unknown codes become a plain ``RemoteError``."""
    cls = _BY_CODE.get(payload.code, RemoteError)
    where = f" (from peer {peer})" if peer else ""
    err = cls(payload.message + where)
    err.retryable = payload.retryable
    return err  # type: ignore[return-value]


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 7] -> '0:3, 7:8' (half-open spans, like --block-indices)."""
    spans: list[str] = []
    for i in sorted(indices):
        if spans and int(spans[-1].split(":")[1]) == i:
            start = spans[-1].split(":")[0]
            spans[-1] = f"{start}:{i + 1}"
        else:
            spans.append(f"{i}:{i + 1}")
    return ", ".join(spans)
