"""Re-wrapping a stored key under the active domain-key generation, by its KMS key spec.

PKCS#11 unwraps only into a key of a named class and type, so a blob is
re-wrapped knowing what it holds: the key spec of its KMS key (or of the
import wrapping key, or of the audit digest key). The material is unwrapped
into an extractable session object inside the token, wrapped again under the
active generation and destroyed; it never reaches the host.

Hazmat: only the service layer calls this module. Never logs or raises with
key material in it.
"""

from __future__ import annotations

from typing import Any

from pkcs11 import Attribute, KeyType, ObjectClass

from kmsd.hsm.capabilities import (
    EC_KEY_SPECS,
    ED25519_KEY_SPEC,
    HMAC_KEY_SPECS,
    PRIVATE_UNWRAP_FIX,
    RSA_KEY_SPECS,
)
from kmsd.hsm.partition import HsmError, HsmPartition

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"


def key_shape(key_spec: str) -> tuple[ObjectClass, KeyType, dict[Attribute, Any]]:
    """(object class, key type, extra unwrap template) of a wrapped key of this spec."""
    if key_spec == SYMMETRIC_DEFAULT:
        return ObjectClass.SECRET_KEY, KeyType.AES, {}
    if key_spec in HMAC_KEY_SPECS:
        return ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, {}
    if key_spec in RSA_KEY_SPECS:
        return ObjectClass.PRIVATE_KEY, KeyType.RSA, dict(PRIVATE_UNWRAP_FIX)
    if key_spec in EC_KEY_SPECS:
        return ObjectClass.PRIVATE_KEY, KeyType.EC, dict(PRIVATE_UNWRAP_FIX)
    if key_spec == ED25519_KEY_SPEC:
        return ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS, dict(PRIVATE_UNWRAP_FIX)
    raise HsmError(f"no wrapped-key shape for key spec {key_spec}")


def rewrap_key(partition: HsmPartition, blob: bytes, key_spec: str) -> bytes:
    object_class, key_type, template = key_shape(key_spec)
    return partition.rewrap(blob, object_class, key_type, template)
