"""Asymmetric, HMAC and key-agreement keys: their creation in the HSM, GetPublicKey, Sign,
Verify, GenerateMac, VerifyMac and DeriveSharedSecret.

A key's private (or HMAC secret) part is generated in this node's HSM and enters the Raft log
only wrapped under the domain key; its public key (DER SubjectPublicKeyInfo) is stored in the
clear. Private-key operations run in the HSM: inline when cheap, in the HSM helper process
when slow (RSA key generation, RSA-3072/4096 signing; kmsd.hsm.asymmetric_router). Public-key
operations (Verify) run on the host, as anyone holding the public key could.

What the token cannot do is refused with UnsupportedOperationException naming the key spec
or algorithm and the token (kmsd.hsm.capabilities, probed at start-up); what AWS itself
refuses is refused with AWS's error first (kmsd.service.key_specs).

Never logs or puts into an error a message, digest, signature, MAC or shared secret.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from cluster.state import KeyRecord
from kmsd.errors import (
    DryRunOperationException,
    KMSInvalidMacException,
    KMSInvalidSignatureException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsd.hsm import asymmetric
from kmsd.hsm.asymmetric import DIGEST_LENGTHS, GeneratedKey
from kmsd.hsm.capabilities import ED25519_SHA_512, MAC_ALGORITHMS, UNSUPPORTED
from kmsd.service.asymmetric_hsm import hsm_errors, router_of
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.key_specs import (
    ECDH,
    GENERATE_VERIFY_MAC,
    KEY_AGREEMENT,
    SIGN_VERIFY,
    algorithm_lists,
    curve_of,
    is_asymmetric,
    require_usage,
    signing_algorithms,
    wrong_algorithm,
)

DRY_RUN_MESSAGE = "The request would have succeeded, but the DryRun option is set."
RAW = "RAW"
DIGEST = "DIGEST"
EXTERNAL_MU = "EXTERNAL_MU"


def _dry_run(params: dict[str, Any]) -> None:
    if params.get("DryRun"):
        raise DryRunOperationException(DRY_RUN_MESSAGE)


def _no_recipient(params: dict[str, Any], operation: str) -> None:
    if params.get("Recipient"):
        raise UnsupportedOperationException(
            f"kmsd has no Nitro Enclaves attestation: {operation} does not take a Recipient.")


# -- CreateKey -----------------------------------------------------------------------------

def require_creatable(core: ServiceCore, key_spec: str) -> None:
    """UnsupportedOperationException, naming the key spec and the token, if this node's token
    cannot hold `key_spec` keys the way kmsd keeps them (generated inside, kept wrapped)."""
    capabilities = router_of(core).capabilities
    try:
        entry = capabilities.entry(key_spec)
    except KeyError:
        entry = None
    if entry is None or entry.path == UNSUPPORTED:
        why = entry.detail if entry is not None else "kmsd does not know this key spec"
        raise UnsupportedOperationException(
            f"KeySpec {key_spec} is not supported by this kmsd node's HSM token "
            f"{capabilities.token_label!r} ({capabilities.token_manufacturer.strip()} "
            f"{capabilities.token_model.strip()}): {why}.")


async def generate_key(core: ServiceCore, key_spec: str) -> GeneratedKey:
    """A new key of `key_spec`, made in the HSM; only its wrapped private part comes back."""
    with hsm_errors():
        return await router_of(core).generate(key_spec)


# -- GetPublicKey --------------------------------------------------------------------------

async def get_public_key(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "GetPublicKey", params)
    if not is_asymmetric(record.key_spec):
        raise UnsupportedOperationException(
            f"{record.arn} is a {record.key_spec} key: only asymmetric KMS keys have a "
            "public key.")
    # An EXTERNAL key has its public key once its private key is imported (PendingImport
    # before that: the key-state check answers).
    core.require_usable(record)
    assert record.public_key is not None
    return {"KeyId": record.arn, "PublicKey": record.public_key,
            "CustomerMasterKeySpec": record.key_spec, "KeySpec": record.key_spec,
            "KeyUsage": record.key_usage, **algorithm_lists(record.key_spec, record.key_usage)}


# -- Sign / Verify -------------------------------------------------------------------------

def _check_signing(record: KeyRecord, params: dict[str, Any], operation: str) -> tuple[str, str]:
    """The checks Sign and Verify share; returns (signing algorithm, message type)."""
    require_usage(record, SIGN_VERIFY, operation)
    algorithm = params["SigningAlgorithm"]
    if algorithm not in signing_algorithms(record.key_spec):
        raise wrong_algorithm(algorithm, record.key_spec)
    message_type = params.get("MessageType") or RAW
    if message_type == EXTERNAL_MU:
        raise ValidationException(f"MessageType {EXTERNAL_MU} is valid only with ML-DSA keys; "
                                  f"{record.arn} is a {record.key_spec} key.")
    if message_type == DIGEST:
        expected = DIGEST_LENGTHS.get(algorithm)
        if algorithm == ED25519_SHA_512 or len(params["Message"]) != expected:
            raise ValidationException(f"Digest is invalid length for algorithm {algorithm}.")
    return algorithm, message_type


async def sign(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "Sign", params)
    algorithm, message_type = _check_signing(record, params, "Sign")
    core.require_usable(record)
    _dry_run(params)
    with hsm_errors():
        signature = await router_of(core).sign(record.current_backing_key.wrapped,
                                               record.key_spec, algorithm, params["Message"],
                                               message_type)
    return {"KeyId": record.arn, "Signature": signature, "SigningAlgorithm": algorithm}


async def verify(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "Verify", params)
    algorithm, message_type = _check_signing(record, params, "Verify")
    core.require_usable(record)
    _dry_run(params)
    assert record.public_key is not None
    with hsm_errors():
        valid = asymmetric.verify(record.public_key, algorithm, params["Message"],
                                  message_type, params["Signature"])
    if not valid:
        # AWS answers an invalid signature with this error and no message.
        raise KMSInvalidSignatureException()
    return {"KeyId": record.arn, "SignatureValid": True, "SigningAlgorithm": algorithm}


# -- GenerateMac / VerifyMac -----------------------------------------------------------------

def _check_mac(record: KeyRecord, params: dict[str, Any], operation: str) -> str:
    require_usage(record, GENERATE_VERIFY_MAC, operation)
    algorithm = params["MacAlgorithm"]
    if algorithm not in MAC_ALGORITHMS.get(record.key_spec, ()):
        raise wrong_algorithm(algorithm, record.key_spec)
    return algorithm


async def generate_mac(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "GenerateMac", params)
    algorithm = _check_mac(record, params, "GenerateMac")
    core.require_usable(record)
    _dry_run(params)
    with hsm_errors():
        mac = router_of(core).generate_mac(record.current_backing_key.wrapped, record.key_spec,
                                           algorithm, params["Message"])
    return {"Mac": mac, "MacAlgorithm": algorithm, "KeyId": record.arn}


async def verify_mac(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "VerifyMac", params)
    algorithm = _check_mac(record, params, "VerifyMac")
    core.require_usable(record)
    _dry_run(params)
    with hsm_errors():
        valid = router_of(core).verify_mac(record.current_backing_key.wrapped, record.key_spec,
                                           algorithm, params["Message"], params["Mac"])
    if not valid:
        raise KMSInvalidMacException()
    return {"KeyId": record.arn, "MacValid": True, "MacAlgorithm": algorithm}


# -- DeriveSharedSecret ------------------------------------------------------------------------

def _check_peer_public_key(record: KeyRecord, public_key_der: bytes) -> None:
    curve = curve_of(record.key_spec)
    try:
        peer = load_der_public_key(public_key_der)
    except (ValueError, UnsupportedAlgorithm):
        raise ValidationException("PublicKey is not a DER-encoded X.509 public key "
                                  "(SubjectPublicKeyInfo).") from None
    if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != curve:
        raise ValidationException(f"PublicKey must be an elliptic curve public key on the "
                                  f"curve of {record.arn}, {record.key_spec} ({curve}).")


async def derive_shared_secret(core: ServiceCore, ctx: RequestContext,
                               params: dict[str, Any]) -> dict:
    _no_recipient(params, "DeriveSharedSecret")
    record = await core.authorized_key(ctx, "DeriveSharedSecret", params)
    require_usage(record, KEY_AGREEMENT, "DeriveSharedSecret")
    algorithm = params["KeyAgreementAlgorithm"]
    if algorithm != ECDH:
        raise wrong_algorithm(algorithm, record.key_spec)
    core.require_usable(record)
    # The peer's key is checked (DER SPKI, EC, same curve) before a dry run answers.
    _check_peer_public_key(record, params["PublicKey"])
    _dry_run(params)
    with hsm_errors():
        secret = router_of(core).derive_shared_secret(
            record.current_backing_key.wrapped, record.key_spec, params["PublicKey"], algorithm)
    return {"KeyId": record.arn, "SharedSecret": secret, "KeyAgreementAlgorithm": algorithm,
            "KeyOrigin": record.origin}
