"""RPC metadata: pydantic models carried as JSON in hivemind's ExpertRequest/ExpertResponse.metadata.

Inference is a bidirectional stream. Every request carries one step (hidden states for positions
[position, position + S)); the first request also carries ``open``. Every response carries the span's output
for that step, or an ``error`` after which the server closes the stream.

Server-to-server push: a step may name ``push_to``, the next span of the route; the server then also sends its
output there itself (``rpc_push`` with a ``PushRequest``), in the background, without holding its answer. A step
with ``pushed`` set carries no tensors: its input comes by push, matched by the session-wide ``seq``, or (the
client path, when no push came in time) from the client in a later message of the same stream with ``fill`` set.
The server uses whichever arrives first, exactly once, and says in ``StepResult.filled`` which one it was.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm import PROTOCOL_VERSION
from swarm.auth import RpcProof
from swarm.errors import BadRequestError, ErrorPayload, ProtocolMismatchError
from swarm.tensors import Compression


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, raw: bytes):
        try:
            return cls.model_validate_json(raw or b"{}")
        except ValidationError as e:
            raise BadRequestError(f"malformed {cls.__name__}: {e.errors(include_url=False)}") from None


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linears of a decoder block that client-side LoRA may adapt (Hugging Face names of Llama-style layers)."""


class LoraSpec(_Message):
    """Client-side LoRA on the span: ``y = W x + (alpha / rank) * B A x`` for each target linear."""

    rank: int = Field(gt=0)
    alpha: float
    targets: tuple[str, ...] = Field(min_length=1)
    """Checked by the server (known names, no repeats), so that a bad name gets a clear error."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class TuningSpec(_Message):
    """Trainable tensors that travel after a request's hidden states (and grad_output), in this order, each with
    the span's blocks on dim 0 (N = end - start):

        deep prompts [N, K, D]                       if ``prompts`` = K > 0: added to positions [0, K) before each block
        A [N, rank, in], B [N, out, rank]            for each of ``lora.targets``, in that order

    rpc_backward answers with the gradient for the hidden states, then one per trainable tensor, same order.
    A server without tuning support refuses such requests by their tensor count, never silently ignores them.
    """

    prompts: int = Field(0, ge=0)
    lora: LoraSpec | None = None

    @property
    def num_tensors(self) -> int:
        return (1 if self.prompts else 0) + (2 * len(self.lora.targets) if self.lora else 0)


class SpanRequest(_Message):
    """Which blocks of which model a request is for."""

    protocol_version: int = PROTOCOL_VERSION
    model_id: str
    start: int = Field(ge=0)
    end: int = Field(gt=0)
    auth: RpcProof | None = None
    """Proof of the swarm secret (private swarms only; ``swarm.auth``)."""
    compression: Compression = "none"
    """How the server should compress the activations it sends back (clients compress theirs the same way)."""
    adapter: str | None = None
    """A LoRA adapter the server serves by name (announced in its record) to apply to these blocks. Servers that
    predate adapters would ignore the field, but they announce no adapters, so routing never sends them one."""

    def check_version(self) -> None:
        if self.protocol_version != PROTOCOL_VERSION:
            raise ProtocolMismatchError(
                f"client speaks protocol {self.protocol_version}, this server speaks {PROTOCOL_VERSION}"
            )


class OpenSession(SpanRequest):
    session_id: str = Field(min_length=1, max_length=64)
    max_length: int = Field(gt=0)
    batch_size: int = Field(default=1, gt=0)
    tuning: TuningSpec | None = None
    """Trainable tensors for every step of the session; they follow the hidden states of the opening step."""


class PushTarget(_Message):
    """Where a span's output goes next: the server of the route's next span, and that span's first block."""

    peer_id: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0)


class InferenceStep(_Message):
    """One step of an inference stream; tensors: [hidden [B, S, D]] (+ the session's tuning tensors when opening),
    or none when ``pushed``."""

    open: OpenSession | None = None
    position: int = Field(ge=0, description="position of the first token of this step in the session")
    step_id: int = 0
    seq: int = Field(default=0, ge=0, description="session-wide step number, the same on every hop (push key)")
    push_to: PushTarget | None = None
    """Also push this step's output to that server (its stream for this session waits for it)."""
    pushed: bool = False
    """No tensors: the input of step ``seq`` will be pushed by the previous server (or filled by the client)."""
    fill: bool = False
    """The client's copy of the input of pushed step ``seq`` (sent when no push came in time); tensors: [hidden]."""


class StepResult(_Message):
    """Server's answer to a step; tensors: [hidden [B, S, D]] unless ``error`` is set."""

    step_id: int = 0
    position: int = 0
    filled: bool = False
    """The input of this pushed step came from the client's fill, not from the previous server."""
    error: ErrorPayload | None = None


class ForwardRequest(SpanRequest):
    """Stateless forward; tensors: [hidden [B, S, D]]. For backward, tensors: [hidden, grad_output].
    With ``tuning``, its tensors follow (``TuningSpec``)."""

    tuning: TuningSpec | None = None


class PushRequest(_Message):
    """A span's output pushed to the server of the next span; tensors: [hidden [B, S, D]]. Answer: RpcResult."""

    protocol_version: int = PROTOCOL_VERSION
    session_id: str = Field(min_length=1, max_length=64)
    client_peer_id: str = Field(min_length=1, max_length=128, description="the peer that owns the session")
    start: int = Field(ge=0, description="first block of the receiving span")
    seq: int = Field(gt=0)
    position: int = Field(ge=0)
    auth: RpcProof | None = None
    """Private swarms: the pushing server's proof of the swarm secret."""


class RpcResult(_Message):
    error: ErrorPayload | None = None


class ServerInfoResult(_Message):
    """Answer to rpc_info: the server's own view of itself (also a cheap latency probe)."""

    protocol_version: int = PROTOCOL_VERSION
    version: str = ""
    model_id: str = ""
    start: int = 0
    end: int = 0
    cache_tokens_left: int = 0
    active_sessions: int = 0
    max_batch_sessions_seen: int = 0
    """Most sessions whose steps one forward of this server has run together (continuous batching)."""
    max_batch_rows_seen: int = 0
    """Most rows (sum of those sessions' batch sizes) one forward has run."""
    batched_steps: int = 0
    """Steps that ran in a forward shared with another session's."""
    batches_run: int = 0
    """Inference forwards (batches) run so far; ``steps_run / batches_run`` is the mean batch in sessions."""
    steps_run: int = 0
    """Session steps (or prefill chunks) those forwards ran, summed."""
    batch_compute_s: float = 0.0
    """Seconds the compute thread spent running them."""
    pushes_sent: int = 0
    """Step outputs this server pushed to the next server, which took them."""
    pushes_failed: int = 0
    """Pushes that the next server refused or that did not reach it."""
    inputs_pushed: int = 0
    """Steps whose input arrived by push from the previous server."""
    inputs_filled: int = 0
    """Steps that waited for a push but got their input from the client instead."""
