"""Records tied to their writer: signatures by the key a peer id hashes, checked by readers and DHT validators."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.validation import DHTRecord
from hivemind.p2p.p2p_daemon import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
from hivemind.utils import MSGPackSerializer

from swarm.auth import SwarmSecret
from swarm.dht import newest_records
from swarm.identity import (
    MAX_RECORD_TTL_S,
    IdentityError,
    RecordSigner,
    SignedRecordValidator,
    load_identity,
    verify_record,
)
from swarm.records import ServerRecord, ServerState


@pytest.fixture(scope="module")
def signers() -> list[RecordSigner]:
    return [RecordSigner(rsa.generate_private_key(public_exponent=65537, key_size=2048)) for _ in range(2)]


def _record(start=0, end=2, state=ServerState.ONLINE, throughput=10.0) -> dict:
    return ServerRecord(model_id="m", start=start, end=end, state=state, throughput=throughput).to_wire()


def test_peer_id_matches_libp2p_derivation(tmp_path):
    """The peer id we derive from a hivemind identity file is the one libp2p derives (PeerID.from_identity)."""
    path = tmp_path / "identity.key"
    P2P.generate_identity(str(path))
    assert RecordSigner(load_identity(path)).peer_id == PeerID.from_identity(path.read_bytes()).to_base58()


def test_non_identity_file_is_refused(tmp_path):
    path = tmp_path / "bad.key"
    path.write_bytes(b"\x08\x01\x12\x03abc")  # an Ed25519-typed protobuf key
    with pytest.raises(IdentityError):
        load_identity(path)


def test_signed_record_verifies_only_under_its_peer(signers):
    alice, bob = signers
    wire = alice.sign(_record())
    assert verify_record(wire, alice.peer_id)
    assert not verify_record(wire, bob.peer_id), "a record copied under another peer's subkey"
    assert not verify_record(_record(), alice.peer_id), "an unsigned record"


def test_tampered_or_rekeyed_record_fails(signers):
    alice, bob = signers
    wire = alice.sign(_record())
    assert not verify_record({**wire, "throughput": 1e9}, alice.peer_id), "a changed field"
    assert not verify_record({**wire, "end": 4}, alice.peer_id)
    # bob signs a record and claims alice's peer id with his own key: the key does not hash to alice's id
    assert not verify_record(bob.sign(_record()), alice.peer_id)
    # bob pastes alice's public key but signs with his own private key
    forged = {**bob.sign(_record()), "public_key": alice.public_key}
    assert not verify_record(forged, alice.peer_id)
    assert not verify_record({**wire, "signature": "not base64!"}, alice.peer_id)


def test_unknown_fields_from_newer_servers_still_verify(signers):
    alice, _ = signers
    wire = alice.sign({**_record(), "some_future_field": [1, 2]})
    assert verify_record(wire, alice.peer_id)
    assert ServerRecord.from_wire(wire) is not None


def test_private_swarm_hmac_and_identity_signature_coexist(signers):
    alice, _ = signers
    secret = SwarmSecret("s3cret")
    wire = alice.sign(_record())
    wire["auth"] = secret.sign_record(wire, alice.peer_id)
    assert verify_record(wire, alice.peer_id) and secret.verify_record(wire, alice.peer_id)
    assert newest_records({"k": {alice.peer_id: (wire, time.time() + 5)}}, "m", 4, secret)


def test_newest_records_ignores_forged_and_prefers_latest_signature(signers):
    alice, bob = signers
    now = time.time()
    honest = alice.sign(_record(0, 2), now=now)
    replayed_old = alice.sign(_record(2, 4), now=now - 100)  # an old, genuinely signed record
    forged = {**bob.sign(_record(0, 4, throughput=1e9)), "public_key": alice.public_key}
    unsigned_fake = _record(0, 4, throughput=1e9)
    raw = {
        "block0": {alice.peer_id: (honest, now + 5), "fake-peer": (unsigned_fake, now + 5)},
        "block2": {alice.peer_id: (replayed_old, now + 1000)},  # replayed with a later expiration
        "block3": {bob.peer_id: (forged, now + 5)},
    }
    servers = newest_records(raw, "m", 4)
    assert set(servers) == {alice.peer_id}
    assert (servers[alice.peer_id].start, servers[alice.peer_id].end) == (0, 2)


def _dht_record(value, subkey, expiration) -> DHTRecord:
    return DHTRecord(b"key", MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value), expiration)


def test_dht_validator_refuses_forged_and_outliving_records(signers):
    alice, bob = signers
    validator = SignedRecordValidator()
    now = time.time()
    wire = alice.sign(_record(), now=now)
    assert validator.validate(_dht_record(wire, alice.peer_id, now + 15))
    assert not validator.validate(_dht_record(wire, bob.peer_id, now + 15))
    assert not validator.validate(_dht_record(_record(), alice.peer_id, now + 15))
    assert not validator.validate(_dht_record(wire, alice.peer_id, now + MAX_RECORD_TTL_S + 1))
    # other values (the model registry) are not server records and pass untouched
    assert validator.validate(_dht_record({"num_blocks": 4, "hidden_size": 64}, "m", now + 15))
