"""BYOK in the token: unwrapping imported key material (KMS ImportKeyMaterial).

Hazmat: only the service layer calls this module. It owns which path each KMS
WrappingAlgorithm takes on this token (`import_path`, shown by `kmsctl hsm
capabilities`) and `import_material`, which turns a customer's wrapped key
material into a backing key wrapped under the domain key plus a key check value
(AES-CMAC of a constant, computed in the token), so that re-imports are compared
by check value, never by plaintext on the host.

Paths:
- in-token: C_UnwrapKey with CKM_RSA_PKCS_OAEP straight into a sensitive AES
  session object (RSAES_OAEP_*), or of the ephemeral AES key, which then
  unwraps the material with CKM_AES_KEY_WRAP_PAD (RSA_AES_KEY_WRAP_*).
- raw-in-token+host-decoding: the token lacks OAEP with that hash (SoftHSM2
  2.6.1 and SHA-256, FACTS.md §0.2): CKM_RSA_X_509 in the token, OAEP decoding on
  the host (kmsd.hsm.oaep), and the recovered key put straight back into the
  token with C_CreateObject (sensitive). The material then passes through host
  memory, so this path is taken only for a software token -- SoftHSM2's "HSM" is
  this process's memory anyway -- or when the operator allows it explicitly;
  with a hardware token it is "unsupported", naming the token.

Every failure to unwrap the customer's blob is one `HsmAuthenticationFailed()`
with no detail. Never logs, returns or raises with key material in it.
Synchronous; run it where the partition lives (the HSM helper process for
RSA-3072/4096 wrapping keys).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error

from kmsd import domain_blob
from kmsd.hsm import oaep
from kmsd.hsm.capabilities import (
    IN_TOKEN,
    PRIVATE_UNWRAP_FIX,
    RAW_IN_TOKEN_HOST_DECODING,
    RSA_KEY_SPECS,
    UNSUPPORTED,
    TokenCapabilities,
)
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError, HsmPartition, NoDomainKey

RSAES_OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"
RSA_AES_KEY_WRAP_SHA_1 = "RSA_AES_KEY_WRAP_SHA_1"
RSA_AES_KEY_WRAP_SHA_256 = "RSA_AES_KEY_WRAP_SHA_256"
RSAES_PKCS1_V1_5 = "RSAES_PKCS1_V1_5"
SM2PKE = "SM2PKE"
# WrappingAlgorithm -> (OAEP hash, whether the material follows as CKM_AES_KEY_WRAP_PAD).
WRAPPING_ALGORITHMS: dict[str, tuple[str, bool]] = {
    RSAES_OAEP_SHA_1: ("sha1", False), RSAES_OAEP_SHA_256: ("sha256", False),
    RSA_AES_KEY_WRAP_SHA_1: ("sha1", True), RSA_AES_KEY_WRAP_SHA_256: ("sha256", True)}
# Refused whatever the token: AWS no longer accepts PKCS#1 v1.5 for import; SM2 is China-only.
REFUSED_WRAPPING_ALGORITHMS: dict[str, str] = {
    RSAES_PKCS1_V1_5: "AWS KMS no longer accepts RSAES_PKCS1_V1_5 for key import",
    SM2PKE: "SM2PKE is available only in China Regions; kmsd does not implement SM2"}
WRAPPING_KEY_SPECS = tuple(RSA_KEY_SPECS)
KIND_WRAPPING = "wrapping_algorithm"

# What the key check value is a MAC of; changing it changes every stored check value.
_CHECK_VALUE_INPUT = b"kmsd imported key material check"
AES_256_WRAPPED_BYTES = 40  # CKM_AES_KEY_WRAP_PAD of a 32-byte key
_OAEP_PARAMS = {"sha1": (Mechanism.SHA_1, MGF.SHA1, None),
                "sha256": (Mechanism.SHA256, MGF.SHA256, None)}
_OAEP_ALGORITHM = {"sha1": "RSAES_OAEP_SHA_1", "sha256": "RSAES_OAEP_SHA_256"}
_MATERIAL_CAPABILITIES = MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT | MechanismFlag.SIGN


class ImportRefused(Exception):
    """This token (named in the message) cannot take this wrapping algorithm."""


class InvalidMaterial(Exception):
    """The unwrapped material is not what the key spec needs (e.g. not 256 bits)."""


@dataclass(frozen=True)
class ImportedMaterial:
    wrapped: bytes       # KWP under the domain key
    check_value: str     # hex AES-CMAC of a constant under the imported key, from the token


def is_software_token(capabilities: TokenCapabilities) -> bool:
    """SoftHSM2 keeps its keys in the kmsd process's memory: no hardware boundary to keep."""
    return any("softhsm" in text.lower()
               for text in (capabilities.token_manufacturer, capabilities.token_model))


def import_path(capabilities: TokenCapabilities, wrapping_algorithm: str,
                allow_host_decoding: bool = False) -> tuple[str, str]:
    """(path, detail) of a WrappingAlgorithm on this token; pure."""
    if wrapping_algorithm in REFUSED_WRAPPING_ALGORITHMS:
        return UNSUPPORTED, REFUSED_WRAPPING_ALGORITHMS[wrapping_algorithm]
    if wrapping_algorithm not in WRAPPING_ALGORITHMS:
        return UNSUPPORTED, f"unknown wrapping algorithm {wrapping_algorithm}"
    hash_name, aes_wrap = WRAPPING_ALGORITHMS[wrapping_algorithm]
    then = "; then CKM_AES_KEY_WRAP_PAD of the material in the token" if aes_wrap else ""
    try:
        oaep_entry = capabilities.entry(_OAEP_ALGORITHM[hash_name])
    except KeyError:
        return UNSUPPORTED, "the token was not probed for RSA-OAEP"
    token = (f"token {capabilities.token_label!r} ({capabilities.token_manufacturer.strip()} "
             f"{capabilities.token_model.strip()})")
    if oaep_entry.path == IN_TOKEN:
        return IN_TOKEN, (f"C_UnwrapKey with CKM_RSA_PKCS_OAEP {hash_name.upper()}/MGF1-"
                          f"{hash_name.upper()}{then}; re-wrapped under the domain key")
    if oaep_entry.path == RAW_IN_TOKEN_HOST_DECODING:
        why = ("a software token" if is_software_token(capabilities)
               else "allowed by the operator" if allow_host_decoding else None)
        if why is not None:
            return RAW_IN_TOKEN_HOST_DECODING, (
                f"{oaep_entry.detail}; the recovered key is put back into the token "
                f"(C_CreateObject, sensitive){then} -- the key passes through host memory, "
                f"allowed because this is {why}")
        return UNSUPPORTED, (f"{token} cannot do RSA-OAEP with {hash_name.upper()} in the "
                             "token, and kmsd does not move imported key material through "
                             "host memory on a hardware token")
    return UNSUPPORTED, f"{token}: {oaep_entry.detail}"


def wrapping_rows(capabilities: TokenCapabilities,
                  allow_host_decoding: bool = False) -> list[tuple[str, str, str, str]]:
    """(kind, name, path, detail) per WrappingAlgorithm, for `kmsctl hsm capabilities`."""
    return [(KIND_WRAPPING, name, *import_path(capabilities, name, allow_host_decoding))
            for name in (*WRAPPING_ALGORITHMS, *REFUSED_WRAPPING_ALGORITHMS)]


def _destroy(handle: Any) -> None:
    if handle is not None:
        with contextlib.suppress(PKCS11Error):
            handle.destroy()


def _host_oaep(wrapping_private: Any, ciphertext: bytes, k: int, hash_name: str) -> bytearray:
    try:
        encoded = bytes(wrapping_private.decrypt(ciphertext, mechanism=Mechanism.RSA_X_509))
    except PKCS11Error:
        raise HsmAuthenticationFailed() from None
    return bytearray(oaep.decode(encoded.rjust(k, b"\x00"), hash_name))


def _create_aes(partition: HsmPartition, value: bytearray, capabilities: dict[Attribute, Any]
                ) -> Any:
    if len(value) not in (16, 24, 32):
        raise HsmAuthenticationFailed()
    try:
        return partition.session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False, Attribute.VALUE: bytes(value),
            Attribute.SENSITIVE: True, **capabilities})
    except PKCS11Error:
        raise HsmError("the token refused to create the imported key object") from None
    finally:
        value[:] = bytes(len(value))  # best effort: the host copy does not outlive the call


def import_material(partition: HsmPartition, path: str, wrapping_algorithm: str,
                    wrapped_wrapping_private: bytes, wrapping_key_spec: str,
                    encrypted_key_material: bytes) -> ImportedMaterial:
    """Unwrap AES-256 key material with the import's RSA private key, in the token."""
    if path not in (IN_TOKEN, RAW_IN_TOKEN_HOST_DECODING):
        raise ImportRefused(f"token {partition.token_label!r} has no path for "
                            f"{wrapping_algorithm}")
    hash_name, aes_wrap = WRAPPING_ALGORITHMS[wrapping_algorithm]
    k = RSA_KEY_SPECS[wrapping_key_spec] // 8
    if len(encrypted_key_material) != k and not (aes_wrap and len(encrypted_key_material) > k):
        raise HsmAuthenticationFailed()
    head, tail = encrypted_key_material[:k], encrypted_key_material[k:]
    wrapping_private = ephemeral = material = None
    try:
        try:
            wrapping_private = partition.unwrap(
                wrapped_wrapping_private, ObjectClass.PRIVATE_KEY, KeyType.RSA,
                capabilities=MechanismFlag.UNWRAP | MechanismFlag.DECRYPT,
                template={**PRIVATE_UNWRAP_FIX, Attribute.SENSITIVE: True,
                          Attribute.EXTRACTABLE: False})
        except (PKCS11Error, NoDomainKey):
            raise HsmError("cannot unwrap the import wrapping key under this token's "
                           "domain key") from None
        # The first RSA block: the material itself, or the ephemeral AES key.
        first_capabilities = MechanismFlag.UNWRAP if aes_wrap else _MATERIAL_CAPABILITIES
        first_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: not aes_wrap}
        if path == IN_TOKEN:
            try:
                first = wrapping_private.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, head, store=False,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_PARAMS[hash_name],
                    capabilities=first_capabilities, template=first_template)
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
        else:
            flags = ({Attribute.UNWRAP: True} if aes_wrap else
                     {Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.SIGN: True})
            first = _create_aes(partition, _host_oaep(wrapping_private, head, k, hash_name),
                                {**flags, Attribute.EXTRACTABLE: not aes_wrap})
        if aes_wrap:
            ephemeral = first
            try:
                material = ephemeral.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, tail, store=False,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD, capabilities=_MATERIAL_CAPABILITIES,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
        else:
            material = first
        try:
            wrapped = partition.wrap(material)
            check = bytes(material.sign(_CHECK_VALUE_INPUT, mechanism=Mechanism.AES_CMAC))
        except PKCS11Error:
            raise HsmError("the token could not re-wrap the imported key material") from None
        if len(domain_blob.split_wrap(wrapped)[1]) != AES_256_WRAPPED_BYTES:
            raise InvalidMaterial("SYMMETRIC_DEFAULT key material must be 256 bits")
        return ImportedMaterial(wrapped, check.hex())
    finally:
        for handle in (material, ephemeral, wrapping_private):
            _destroy(handle)
