"""Cloning domain keys from one HSM to another by an ECDH transport key.

The recipient's token makes a P-384 key pair and publishes the public point.
The donor's token makes an ephemeral P-384 pair, derives an AES-256 transport
key by ECDH inside the token and wraps the domain key under it
(CKM_AES_KEY_WRAP_PAD). The recipient derives the same transport key inside
its own token and unwraps the domain key into a token object. The host only
ever sees public points and the wrapped blob.

Two uses: a joining node receives every live domain-key generation at once
(and the cluster's Raft secret), and during a domain-key rotation the leader
sends the new generation to each member (kmsd.service.domain_rotation), which
makes a transport key for that generation alone.

ECDH with KDF NULL uses the raw shared secret as the key (SoftHSM2 has no
CKD_*_KDF for ECDH); a hardware token should be given a KDF here.
"""

from __future__ import annotations

from pkcs11 import KDF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_named_curve_parameters

from kmsd import domain_blob
from kmsd.hsm.partition import (
    DOMAIN_KEY_CAPABILITIES,
    DOMAIN_KEY_TEMPLATE,
    GCM_NONCE_BYTES,
    GCM_TAG_BITS,
    HsmAuthenticationFailed,
    HsmError,
    HsmPartition,
    domain_key_label,
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


def _new_ec_pair(partition: HsmPartition, store: bool,
                 label: str = TRANSPORT_KEY_LABEL) -> tuple[object, object]:
    params = partition.session.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE)}, local=True)
    return params.generate_keypair(
        store=store, label=label if store else None,
        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                          Attribute.DERIVE: True})


def _transport_key(private_key: object, peer_point: bytes, capability: MechanismFlag) -> object:
    return private_key.derive_key(  # type: ignore[attr-defined]
        KeyType.AES, 256, store=False, capabilities=capability,
        mechanism_param=(KDF.NULL, None, _raw_point(peer_point)),
        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})


def rotation_transport_label(generation: int) -> str:
    return f"{TRANSPORT_KEY_LABEL}-g{generation}"


def make_transport_key(partition: HsmPartition, label: str = TRANSPORT_KEY_LABEL,
                       for_join: bool = True) -> bytes:
    """Recipient, step 1: a fresh transport key pair in the token; returns its public point.
    A joining node's token must hold no domain key yet."""
    if for_join and partition.has_domain_key():
        raise HsmError(f"token {partition.token_label!r} already holds a domain key")
    discard_transport_key(partition, label)
    public, _private = _new_ec_pair(partition, store=True, label=label)
    return bytes(public[Attribute.EC_POINT])  # type: ignore[index]


def wrap_domain_keys_for(partition: HsmPartition, recipient_point: bytes,
                         generations: list[int], secret: bytes = b""
                         ) -> tuple[bytes, dict[int, bytes], bytes]:
    """Donor: wrap these generations' domain keys for the recipient, and seal `secret` (the
    cluster's Raft secret) under the same transport key with AES-GCM; returns
    (our point, generation -> wrapped domain key, nonce || sealed secret)."""
    public, private = _new_ec_pair(partition, store=False)
    transport = _transport_key(private, recipient_point,
                               MechanismFlag.WRAP | MechanismFlag.ENCRYPT)
    try:
        wrapped = {generation: bytes(transport.wrap_key(  # type: ignore[attr-defined]
            partition.generation_key(generation), mechanism=Mechanism.AES_KEY_WRAP_PAD))
            for generation in generations}
        nonce = partition.random(GCM_NONCE_BYTES)
        sealed = transport.encrypt(  # type: ignore[attr-defined]
            secret, mechanism=Mechanism.AES_GCM,
            mechanism_param=GCMParams(nonce, _SECRET_AAD, GCM_TAG_BITS))
        return (bytes(public[Attribute.EC_POINT]), wrapped,  # type: ignore[index]
                nonce + bytes(sealed))
    finally:
        for obj in (transport, private, public):
            obj.destroy()  # type: ignore[attr-defined]


def accept_domain_keys(partition: HsmPartition, donor_point: bytes, wrapped: dict[int, bytes],
                       sealed_secret: bytes = b"", label: str = TRANSPORT_KEY_LABEL) -> bytes:
    """Recipient, step 2: unwrap the domain keys into this token (one token object per
    generation; a generation it holds already is refused), open the sealed secret (if any)
    and drop the transport pair. Returns the secret."""
    for generation in wrapped:
        if partition.has_domain_key(generation):
            raise HsmError(f"token {partition.token_label!r} already holds a domain key of "
                           f"generation {generation}")
    try:
        private = partition.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
    except PKCS11Error:
        raise HsmError("no transport key is waiting in the token") from None
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
        for generation, blob in sorted(wrapped.items()):
            try:
                transport.unwrap_key(  # type: ignore[attr-defined]
                    ObjectClass.SECRET_KEY, KeyType.AES, blob,
                    label=domain_key_label(generation), store=True,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD, capabilities=DOMAIN_KEY_CAPABILITIES,
                    template=DOMAIN_KEY_TEMPLATE)
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
    finally:
        transport.destroy()  # type: ignore[attr-defined]
    discard_transport_key(partition, label)
    return secret


def discard_transport_key(partition: HsmPartition, label: str = TRANSPORT_KEY_LABEL) -> None:
    for obj in list(partition.session.get_objects({Attribute.LABEL: label})):
        obj.destroy()


def wrap_domain_key_for(partition: HsmPartition, recipient_point: bytes,
                        secret: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """Generation 1 alone (setting up a new cluster's tokens): (point, wrapped, sealed)."""
    point, wrapped, sealed = wrap_domain_keys_for(
        partition, recipient_point, [domain_blob.FIRST_GENERATION], secret)
    return point, wrapped[domain_blob.FIRST_GENERATION], sealed


def accept_domain_key(partition: HsmPartition, donor_point: bytes, wrapped: bytes,
                      sealed_secret: bytes = b"") -> bytes:
    return accept_domain_keys(partition, donor_point, {domain_blob.FIRST_GENERATION: wrapped},
                              sealed_secret)
