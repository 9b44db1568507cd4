"""Signed digests of the audit chain, like CloudTrail's digest files.

Every few minutes (and on demand) the leader signs the chain head (seq, hash)
with an ECDSA P-256 key held in the HSM (generated there, stored only wrapped
under the domain key) and appends the signature to the chain itself as an
`AuditDigest` event. Anyone with the published public key can check offline
that the chain up to each digest is the one the cluster signed; a rewritten
history would need the HSM to sign again.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kmsd.audit.chain import ChainedRecord, canonical_bytes
from kmsd.hsm import asymmetric

KEY_SPEC = "ECC_NIST_P256"
ALGORITHM = "ECDSA_SHA_256"
EVENT_NAME = "AuditDigest"


def public_key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def digest_message(seq: int, chain_hash: str, digest_time: str) -> bytes:
    return canonical_bytes({"kmsd-audit-digest": 1, "seq": seq, "hash": chain_hash,
                            "time": digest_time})


def digest_event(seq: int, chain_hash: str, digest_time: str, signature: bytes,
                 public_key: bytes, region: str, account_id: str, event_id: str,
                 request_id: str) -> dict[str, Any]:
    return {
        "eventVersion": "1.08", "eventTime": digest_time, "eventSource": "kms.amazonaws.com",
        "eventName": EVENT_NAME, "awsRegion": region, "eventType": "AwsServiceEvent",
        "eventID": event_id, "requestID": request_id, "readOnly": True,
        "managementEvent": True, "recipientAccountId": account_id,
        "eventCategory": "Management",
        "userIdentity": {"type": "AWSService", "invokedBy": "kms.amazonaws.com"},
        "additionalEventData": {
            "digestSeq": seq, "digestHash": chain_hash, "signatureAlgorithm": ALGORITHM,
            "signature": base64.b64encode(signature).decode(),
            "publicKeyId": public_key_id(public_key)},
    }


@dataclass(frozen=True)
class DigestCheck:
    digests: int
    bad_seq: int | None = None  # seq of the first digest record that does not verify
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.bad_seq is None


def check_digests(records: Iterable[ChainedRecord], public_key: bytes) -> DigestCheck:
    """Verify every digest record's signature, and that it signs the chain as it stands."""
    hashes: dict[int, str] = {}
    count = 0
    for record in records:
        hashes[record.seq] = record.hash
        event = record.event
        if event.get("eventName") != EVENT_NAME:
            continue
        count += 1
        data = event.get("additionalEventData") or {}
        seq, chain_hash = data.get("digestSeq"), data.get("digestHash")
        if data.get("publicKeyId") != public_key_id(public_key):
            return DigestCheck(count, record.seq, "signed by another key")
        if not isinstance(seq, int) or hashes.get(seq) != chain_hash:
            return DigestCheck(count, record.seq, "the chain it signed has changed")
        try:
            signature = base64.b64decode(data.get("signature", ""), validate=True)
        except ValueError:
            return DigestCheck(count, record.seq, "unreadable signature")
        message = digest_message(seq, chain_hash, event.get("eventTime", ""))
        if not asymmetric.verify(public_key, ALGORITHM, message, "RAW", signature):
            return DigestCheck(count, record.seq, "signature does not verify")
    return DigestCheck(count)
