"""swarm.auth: proofs of a private swarm's secret for RPCs and signatures of DHT records."""

import pytest

from swarm.auth import RpcProof, SwarmSecret, swarm_secret
from swarm.errors import ErrorPayload, UnauthorizedError, error_from_payload
from swarm.messages import ForwardRequest
from swarm.records import ServerRecord, ServerState

NOW = 1_700_000_000.0


def test_a_fresh_proof_for_this_peer_pair_is_accepted():
    secret = SwarmSecret("s3cret")
    proof = secret.prove("QmClient", "QmServer", now=NOW)
    secret.check(proof, "QmClient", "QmServer", now=NOW + 10)
    wire = ForwardRequest(model_id="m", start=0, end=1, auth=proof)  # travels in the request metadata
    assert ForwardRequest.decode(wire.encode()).auth == proof


@pytest.mark.parametrize(
    ("client", "server", "key", "now", "reason"),
    [
        ("QmOther", "QmServer", "s3cret", NOW, "wrong"),  # another client replays it
        ("QmClient", "QmOther", "s3cret", NOW, "wrong"),  # sent to another server
        ("QmClient", "QmServer", "guess", NOW, "wrong"),  # made without the secret
        ("QmClient", "QmServer", "s3cret", NOW + 3600, "old"),  # stale
    ],
)
def test_bad_proofs_are_refused(client, server, key, now, reason):
    proof = SwarmSecret(key).prove("QmClient", "QmServer", now=NOW)
    with pytest.raises(UnauthorizedError, match=reason) as caught:
        SwarmSecret("s3cret").check(proof, client, server, now=now)
    assert not caught.value.retryable


def test_missing_or_tampered_proof_is_refused():
    secret = SwarmSecret("s3cret")
    with pytest.raises(UnauthorizedError, match="private swarm"):
        secret.check(None, "QmClient", "QmServer")
    proof = secret.prove("QmClient", "QmServer", now=NOW)
    moved = RpcProof(timestamp=NOW + 1, mac=proof.mac)  # a new timestamp needs a new mac
    with pytest.raises(UnauthorizedError):
        secret.check(moved, "QmClient", "QmServer", now=NOW)


def test_record_signatures_bind_the_secret_the_peer_and_every_field():
    secret = SwarmSecret("s3cret")
    record = ServerRecord(model_id="m", start=0, end=2, state=ServerState.ONLINE, throughput=12.5)
    record.auth = secret.sign_record(record.to_wire(), "QmServer")
    wire = record.to_wire()
    assert secret.verify_record(wire, "QmServer")
    assert secret.verify_record({**wire, "field_from_a_newer_version": 1}, "QmServer") is False
    assert not secret.verify_record(wire, "QmOther")  # replayed under another peer's subkey
    assert not secret.verify_record({**wire, "end": 3}, "QmServer")
    assert not SwarmSecret("other").verify_record(wire, "QmServer")
    unsigned = ServerRecord(model_id="m", start=0, end=2, state=ServerState.ONLINE).to_wire()
    assert not secret.verify_record(unsigned, "QmServer") and not secret.verify_record("garbage", "QmServer")
    assert ServerRecord.from_wire(wire) == record  # public clients read signed records as before


def test_records_signed_by_a_newer_server_verify_with_its_extra_fields():
    secret = SwarmSecret("s3cret")
    wire = {**ServerRecord(model_id="m", start=0, end=2, state=ServerState.ONLINE).to_wire(), "new_field": [1]}
    wire["auth"] = secret.sign_record(wire, "QmServer")
    assert secret.verify_record(wire, "QmServer")


def test_unauthorized_travels_as_its_own_code():
    err = error_from_payload(UnauthorizedError("no").to_payload(), peer="QmServer")
    assert isinstance(err, UnauthorizedError) and err.code == "unauthorized" and not err.retryable
    assert error_from_payload(ErrorPayload(code="unauthorized", message="x")).code == "unauthorized"


def test_no_secret_is_a_public_swarm():
    assert swarm_secret(None) is None and swarm_secret("") is None
    assert "s3cret" not in repr(SwarmSecret("s3cret"))
