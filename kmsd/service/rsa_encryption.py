"""RSA keys in Encrypt, Decrypt and ReEncrypt: RSAES_OAEP_SHA_1 and RSAES_OAEP_SHA_256.

The ciphertext is the raw RSAES-OAEP output, exactly as AWS returns it: no header, so it does
not name its key, and Decrypt needs KeyId and EncryptionAlgorithm ("If the ciphertext was
encrypted under an asymmetric KMS key, you must specify the KeyId parameter and the
EncryptionAlgorithm parameter" -- AWS KMS API reference, Decrypt). Anyone holding the
public key (GetPublicKey) can make such a ciphertext; kmsd's Encrypt does the same, on the
host. Decrypt runs the private-key operation in the HSM -- in the helper process for RSA-3072
and RSA-4096 -- and, where the token lacks OAEP with SHA-256, decodes the padding on the host
(kmsd.hsm.oaep): one InvalidCiphertextException for every failure.

Encryption context is not part of asymmetric encryption: AWS refuses it for these keys
("Asymmetric ... algorithms do not support an encryption context").

Never logs or puts into an error plaintext or ciphertext.
"""

from __future__ import annotations

from typing import Any

from cluster.state import KeyRecord
from kmsd.errors import ValidationException
from kmsd.hsm import asymmetric
from kmsd.service.asymmetric_hsm import hsm_errors, router_of
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.key_specs import (
    ENCRYPT_DECRYPT,
    RSAES_OAEP_SHA_1,
    RSAES_OAEP_SHA_256,
    SYMMETRIC_DEFAULT,
    encryption_algorithms,
    require_usage,
    wrong_algorithm,
)

RSA_ENCRYPTION_ALGORITHMS = (RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256)


def is_rsa_algorithm(algorithm: str | None) -> bool:
    return algorithm in RSA_ENCRYPTION_ALGORITHMS


def check_key(record: KeyRecord, algorithm: str | None, context: dict[str, str] | None,
              operation: str) -> str:
    """Usage, algorithm and context checks for an asymmetric ENCRYPT_DECRYPT key; returns the
    algorithm. (The caller has made sure the key is not symmetric.)"""
    require_usage(record, ENCRYPT_DECRYPT, operation)
    chosen = algorithm or SYMMETRIC_DEFAULT
    if chosen not in encryption_algorithms(record.key_spec):
        raise wrong_algorithm(chosen, record.key_spec)
    if context:
        raise ValidationException("EncryptionContext is not supported with asymmetric KMS "
                                  f"keys; {record.arn} is a {record.key_spec} key.")
    return chosen


def max_plaintext_bytes(key_spec: str, algorithm: str) -> int:
    """RFC 8017 §7.1.1: k - 2*hLen - 2 (RSA_2048: 214 with SHA-1, 190 with SHA-256)."""
    return asymmetric.max_plaintext_length(key_spec, algorithm)


def check_plaintext(record: KeyRecord, algorithm: str, plaintext: bytes) -> None:
    limit = max_plaintext_bytes(record.key_spec, algorithm)
    if len(plaintext) > limit:
        raise ValidationException(f"Algorithm {algorithm} and key spec {record.key_spec} "
                                  f"cannot encrypt data larger than {limit} bytes.")


def encrypt(record: KeyRecord, algorithm: str, plaintext: bytes) -> bytes:
    """RSAES-OAEP with the key's public key, on the host (RSA public operations are cheap)."""
    check_plaintext(record, algorithm, plaintext)
    if record.public_key is None:
        raise ValidationException(f"{record.arn} has no public key.")
    with hsm_errors():
        return asymmetric.encrypt(record.public_key, algorithm, plaintext)


async def decrypt(core: ServiceCore, ctx: RequestContext, params: dict[str, Any],
                  ciphertext: bytes, key_id: str | None, algorithm: str,
                  context: dict[str, str] | None, authorize_as: str,
                  operation: str) -> tuple[KeyRecord, bytes]:
    """Decrypt an RSAES-OAEP ciphertext with the key `key_id` names, once the caller may
    `authorize_as` (Decrypt, ReEncryptFrom) on it."""
    if key_id is None:
        raise ValidationException(f"KeyId is required to decrypt with {algorithm}: a "
                                  "ciphertext of an asymmetric KMS key does not name its key.")
    record = await core.authorized_key(ctx, authorize_as, params, identifier=key_id)
    if record.key_spec == SYMMETRIC_DEFAULT:
        require_usage(record, ENCRYPT_DECRYPT, operation)
        raise wrong_algorithm(algorithm, record.key_spec)
    check_key(record, algorithm, context, operation)
    core.require_usable(record)
    with hsm_errors():
        plaintext = await router_of(core).decrypt(record.current_backing_key.wrapped,
                                                  record.key_spec, algorithm, ciphertext)
    return record, plaintext
