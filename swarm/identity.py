"""Records tied to their writer: a server signs its DHT records with the key that its libp2p peer id is made of.

A libp2p peer id of an RSA identity is the SHA-256 multihash of the (protobuf-wrapped) public key. A server puts
its public key, the time of signing and an RSA-PSS signature into every record it announces; the signature covers
the peer id it announces under (the record's DHT subkey) and every other field. Anyone can then check, with no
round trip, that

* the public key hashes to the subkey's peer id (only that peer's key will), and
* the signature verifies under that key (only the holder of the private key can make it).

So a record under subkey P was written by P, and no one can announce on another peer's behalf. The libp2p
connection authenticates the same key, so the peer a client then talks to is the one that wrote the record.
``signed_at`` bounds replays: DHT nodes refuse a record whose expiration lies more than ``MAX_RECORD_TTL_S`` past
its signing, and readers prefer each peer's most recently signed record, so an old record cannot be replayed over
a newer one.

Every swarm DHT node (servers, bootstrap peers) runs ``SignedRecordValidator`` so forged records are not even
stored; clients check again on read (``fetch_coverage``), since a storing node may not run it. Signing covers the
raw wire dict, like ``swarm.auth``'s HMAC, so fields a newer server adds still verify on an older reader.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import base58
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer

from swarm.auth import canonical_json

logger = logging.getLogger(__name__)

MAX_RECORD_TTL_S = 3600.0
"""The longest a signed record may stay in the DHT after it was signed (servers re-announce every few seconds)."""

SIGNED_FIELDS_EXCLUDED = ("auth", "signature")
"""Fields that the identity signature does not cover: itself, and the private-swarm HMAC (made after it)."""

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


class IdentityError(ValueError):
    """An identity file that is not a libp2p RSA private key."""


def load_identity(path: Path) -> rsa.RSAPrivateKey:
    """Read a libp2p identity file (protobuf ``PrivateKey``, as hivemind writes it for ``identity_path``)."""
    message = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    if message.key_type != crypto_pb2.KeyType.RSA:
        raise IdentityError(f"{path}: only RSA identities are supported, got key type {message.key_type}")
    key = serialization.load_der_private_key(message.data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise IdentityError(f"{path}: not an RSA private key")
    return key


def public_key_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def peer_id_of(public_der: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key (DER SubjectPublicKeyInfo), as libp2p derives it."""
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(wrapped).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def signed_payload(wire: Mapping[str, Any], peer_id: str) -> bytes:
    fields = {k: v for k, v in wire.items() if k not in SIGNED_FIELDS_EXCLUDED}
    return f"petals-next record\x00{peer_id}\x00{canonical_json(fields)}".encode()


class RecordSigner:
    """A server's identity key, and the only code that signs with it."""

    def __init__(self, key: rsa.RSAPrivateKey):
        self._key = key
        self.public_key = base64.b64encode(public_key_der(key)).decode()
        self.peer_id = peer_id_of(public_key_der(key))

    def __repr__(self) -> str:
        return f"RecordSigner(peer_id={self.peer_id})"

    def sign(self, wire: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """``wire`` with ``public_key``, ``signed_at`` and ``signature`` set (a new dict)."""
        signed = {**wire, "public_key": self.public_key, "signed_at": time.time() if now is None else now}
        signed.pop("signature", None)
        signature = self._key.sign(signed_payload(signed, self.peer_id), _PSS, hashes.SHA256())
        signed["signature"] = base64.b64encode(signature).decode()
        return signed


def verify_record(wire: Any, peer_id: str) -> bool:
    """Whether ``wire`` was signed by the holder of ``peer_id``'s identity key."""
    if not isinstance(wire, Mapping):
        return False
    public_key, signature = wire.get("public_key"), wire.get("signature")
    if not isinstance(public_key, str) or not isinstance(signature, str) or not isinstance(peer_id, str):
        return False
    return _verify(peer_id, public_key, signature, signed_payload(wire, peer_id))


@functools.lru_cache(maxsize=4096)
def _verify(peer_id: str, public_key: str, signature: str, payload: bytes) -> bool:
    """Cached: clients re-read the same records every few seconds."""
    try:
        der = base64.b64decode(public_key, validate=True)
        if peer_id_of(der) != peer_id:
            return False
        key = serialization.load_der_public_key(der)
        if not isinstance(key, rsa.RSAPublicKey):
            return False
        key.verify(base64.b64decode(signature, validate=True), payload, _PSS, hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def is_server_record(value: Any) -> bool:
    """Whether a DHT value is shaped like a ``ServerRecord`` (the records that must be signed)."""
    return isinstance(value, Mapping) and "model_id" in value and "start" in value and "end" in value


class SignedRecordValidator(RecordValidatorBase):
    """Run by every swarm DHT node: refuse to store or accept server records not signed by their subkey's peer.

    Other values (the model registry, anything else) pass untouched.
    """

    def validate(self, record: DHTRecord) -> bool:
        try:
            value = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
        except Exception:  # not ours to judge: msgpack garbage is no server record
            return True
        if not is_server_record(value):
            return True
        if not isinstance(subkey, str) or not verify_record(value, subkey):
            logger.debug("refusing an unsigned or forged server record under subkey %r", subkey)
            return False
        signed_at = value.get("signed_at")
        if not isinstance(signed_at, int | float) or record.expiration_time > signed_at + MAX_RECORD_TTL_S:
            logger.debug("refusing a server record of %s that outlives its signature", subkey)
            return False
        return True
