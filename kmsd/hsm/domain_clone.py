"""Cloning the domain key from one HSM to another by an ECDH transport key.

The recipient's token makes a P-384 key pair and publishes the public point.
The donor's token makes an ephemeral P-384 pair, derives an AES-256 transport
key by ECDH inside the token and wraps the domain key under it
(CKM_AES_KEY_WRAP_PAD). The recipient derives the same transport key inside
its own token and unwraps the domain key into a token object. The host only
ever sees public points and the wrapped blob.

ECDH with KDF NULL uses the raw shared secret as the key (SoftHSM2 has no
CKD_*_KDF for ECDH); a hardware token should be given a KDF here.
"""

from __future__ import annotations

from pkcs11 import KDF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_named_curve_parameters

from kmsd.hsm.partition import (
    DOMAIN_KEY_CAPABILITIES,
    DOMAIN_KEY_LABEL,
    DOMAIN_KEY_TEMPLATE,
    GCM_NONCE_BYTES,
    GCM_TAG_BITS,
    HsmAuthenticationFailed,
    HsmError,
    HsmPartition,
)

TRANSPORT_KEY_LABEL = "kmsd-transport-key"
_CURVE = "secp384r1"
_SECRET_AAD = b"kmsd join: cluster secret v1"


def _raw_point(ec_point_der: bytes) -> bytes:
    """Strip the DER OCTET STRING header that CKA_EC_POINT carries."""
    if len(ec_point_der) > 2 and ec_point_der[0] == 0x04:
        if ec_point_der[1] == 0x81:
            return ec_point_der[3:]
        if ec_point_der[1] == len(ec_point_der) - 2:
            return ec_point_der[2:]
    return ec_point_der


def _new_ec_pair(partition: HsmPartition, store: bool) -> tuple[object, object]:
    params = partition.session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE)}, local=True)
    return params.generate_keypair(
        store=store, label=TRANSPORT_KEY_LABEL if store else None,
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.DERIVE: True})


def _transport_key(private_key: object, peer_point: bytes, capability: MechanismFlag) -> object:
    return private_key.derive_key(  # type: ignore[attr-defined]
        KeyType.AES, 256, store=False, capabilities=capability,
        mechanism_param=(KDF.NULL, None, _raw_point(peer_point)),
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})


def make_transport_key(partition: HsmPartition) -> bytes:
    """Recipient, step 1: a fresh transport key pair in the token; returns its public point."""
    if partition.has_domain_key():
        raise HsmError(f"token {partition.token_label!r} already holds a domain key")
    for stale in partition.session.get_objects({Attribute.LABEL: TRANSPORT_KEY_LABEL}):
        stale.destroy()
    public, _private = _new_ec_pair(partition, store=True)
    return bytes(public[Attribute.EC_POINT])  # type: ignore[index]


def wrap_domain_key_for(partition: HsmPartition, recipient_point: bytes,
                        secret: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """Donor: wrap this token's domain key for the recipient, and seal `secret` (the
    cluster's Raft secret) under the same transport key with AES-GCM; returns
    (our point, wrapped domain key, nonce || sealed secret)."""
    public, private = _new_ec_pair(partition, store=False)
    transport = _transport_key(private, recipient_point,
                               MechanismFlag.WRAP | MechanismFlag.ENCRYPT)
    try:
        wrapped = transport.wrap_key(  # type: ignore[attr-defined]
            partition.domain_key, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        nonce = partition.random(GCM_NONCE_BYTES)
        sealed = transport.encrypt(  # type: ignore[attr-defined]
            secret, mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(nonce, _SECRET_AAD, GCM_TAG_BITS))
        return (bytes(public[Attribute.EC_POINT]), bytes(wrapped),  # type: ignore[index]
                nonce + bytes(sealed))
    finally:
        for obj in (transport, private, public):
            obj.destroy()  # type: ignore[attr-defined]


def accept_domain_key(partition: HsmPartition, donor_point: bytes, wrapped: bytes,
                      sealed_secret: bytes = b"") -> bytes:
    """Recipient, step 2: unwrap the domain key into this token, open the sealed secret
    (if any) and drop the transport pair. Returns the secret."""
    private = partition.session.get_key(object_class=ObjectClass.PRIVATE_KEY,
                                        label=TRANSPORT_KEY_LABEL)
    transport = _transport_key(private, donor_point,
                               MechanismFlag.UNWRAP | MechanismFlag.DECRYPT)
    secret = b""
    try:
        if sealed_secret:
            nonce, body = sealed_secret[:GCM_NONCE_BYTES], sealed_secret[GCM_NONCE_BYTES:]
            try:
                secret = bytes(transport.decrypt(  # type: ignore[attr-defined]
                    body, mechanism=Mechanism.AES_GCM,
                    mechanism_param=GCMParams(nonce, _SECRET_AAD, GCM_TAG_BITS)))
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
        transport.unwrap_key(  # type: ignore[attr-defined]
            ObjectClass.SECRET_KEY, KeyType.AES, wrapped, label=DOMAIN_KEY_LABEL, store=True,
            mechanism=Mechanism.AES_KEY_WRAP_PAD, capabilities=DOMAIN_KEY_CAPABILITIES,
            template=DOMAIN_KEY_TEMPLATE)
    finally:
        transport.destroy()  # type: ignore[attr-defined]
    for obj in partition.session.get_objects({Attribute.LABEL: TRANSPORT_KEY_LABEL}):
        obj.destroy()
    return secret
