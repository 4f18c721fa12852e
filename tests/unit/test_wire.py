"""Wire formats: RPC metadata, DHT records and the tensor codec reject garbage with typed errors."""

import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm import PROTOCOL_VERSION
from swarm.errors import (
    BadRequestError,
    ErrorPayload,
    ProtocolMismatchError,
    ServerBusyError,
    error_from_payload,
)
from swarm.messages import InferenceStep, OpenSession, StepResult
from swarm.records import ServerRecord, ServerState
from swarm.tensors import decode, encode


def test_step_round_trip():
    open_msg = OpenSession(model_id="m", start=0, end=4, session_id="s", max_length=8)
    step = InferenceStep(open=open_msg, position=3, step_id=2)
    assert InferenceStep.decode(step.encode()) == step


@pytest.mark.parametrize("raw", [b"not json", b'{"position": -1}', b'{"open": {"model_id": 3}}', b"[]"])
def test_malformed_metadata_is_a_bad_request(raw):
    with pytest.raises(BadRequestError):
        InferenceStep.decode(raw)


def test_protocol_version_is_checked():
    msg = OpenSession(model_id="m", start=0, end=4, session_id="s", max_length=8, protocol_version=PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolMismatchError):
        msg.check_version()


def test_unknown_fields_are_ignored():
    raw = b'{"position": 0, "from_the_future": {"x": 1}}'
    assert InferenceStep.decode(raw).position == 0


def test_error_payload_round_trip_keeps_type_and_retryability():
    payload = StepResult.decode(StepResult(error=ServerBusyError("full").to_payload()).encode()).error
    err = error_from_payload(payload, peer="QmPeer")
    assert isinstance(err, ServerBusyError) and err.retryable and "QmPeer" in str(err)
    unknown = error_from_payload(ErrorPayload(code="new_code", message="?"))
    assert unknown.code == "remote_error"


def test_records_are_decoded_tolerantly():
    good = ServerRecord(model_id="m", start=0, end=3, state=ServerState.ONLINE).to_wire()
    assert ServerRecord.from_wire({**good, "new_field": [1, 2]}) is not None
    assert ServerRecord.from_wire({**good, "end": 0}) is None
    assert ServerRecord.from_wire({**good, "state": "dancing"}) is None
    assert ServerRecord.from_wire("garbage") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_codec_round_trip(dtype):
    x = torch.randn(2, 3, 5).to(dtype)
    assert torch.equal(decode(encode(x)), x)


def test_corrupt_tensor_is_a_bad_request():
    message = encode(torch.randn(4, 4))
    broken = runtime_pb2.Tensor(buffer=message.buffer[:7], size=message.size, dtype=message.dtype)
    with pytest.raises(BadRequestError):
        decode(broken)


def test_float16_wire_compression_halves_the_bytes():
    x = torch.randn(2, 5, 64)
    packed, plain = encode(x, "float16"), encode(x)
    assert packed.ByteSize() < 0.55 * plain.ByteSize()
    torch.testing.assert_close(decode(packed), x, atol=2e-3, rtol=1e-3)
