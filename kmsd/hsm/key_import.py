"""BYOK in the token: unwrapping imported key material (KMS ImportKeyMaterial).

Hazmat: only the service layer calls this module. It owns which path each KMS
WrappingAlgorithm takes on this token (`import_path`, shown by `kmsctl hsm
capabilities`), which wrapping algorithms AWS allows for which key material
(`wrapping_refusal`), and `import_material`, which turns a customer's wrapped key
material into a key wrapped under the domain key plus a key check value, so that
re-imports are compared by check value, never by plaintext on the host. What the
material must be per key spec (AES-256, HMAC secret, PKCS#8 RSA or EC private
key) and how the public key is derived is kmsd.hsm.imported_material's.

Paths:
- in-token: C_UnwrapKey with CKM_RSA_PKCS_OAEP straight into a sensitive
  session object of the key spec's type (RSAES_OAEP_*; the token parses a PKCS#8
  private key itself), or of the ephemeral AES key, which then unwraps the
  material with CKM_AES_KEY_WRAP_PAD (RSA_AES_KEY_WRAP_*).
- raw-in-token+host-decoding: the token lacks OAEP with that hash (SoftHSM2
  2.6.1 and SHA-256, FACTS.md §0.2): CKM_RSA_X_509 in the token, OAEP decoding on
  the host (kmsd.hsm.oaep); the recovered ephemeral AES key is put straight back
  into the token with C_CreateObject (sensitive), and recovered material goes
  back under a one-time AES key, so the token types and parses it as on the
  in-token path. The material then passes through host memory, so this path is
  taken only for a software token -- SoftHSM2's "HSM" is this process's memory
  anyway -- or when the operator allows it explicitly; with a hardware token it
  is "unsupported", naming the token.

Every failure to unwrap the customer's blob is one `HsmAuthenticationFailed()`
with no detail. Never logs, returns or raises with key material in it.
Synchronous; run it where the partition lives (the HSM helper process for
RSA-3072/4096 wrapping keys).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error

from kmsd.hsm import imported_material, oaep
from kmsd.hsm.capabilities import (
    IN_TOKEN,
    PRIVATE_UNWRAP_FIX,
    RAW_IN_TOKEN_HOST_DECODING,
    RSA_KEY_SPECS,
    UNSUPPORTED,
    TokenCapabilities,
)
from kmsd.hsm.imported_material import SYMMETRIC_DEFAULT, InvalidMaterial
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError, HsmPartition, NoDomainKey

__all__ = ["ImportRefused", "ImportedMaterial", "InvalidMaterial", "import_material",
           "import_path", "wrapping_refusal", "wrapping_rows"]

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
# Refused whatever the token and whatever the key spec. AWS KMS API reference,
# GetParametersForImport WrappingAlgorithm: "RSAES_PKCS1_V1_5 (Deprecated) -- As of October
# 10, 2023, KMS does not support the RSAES_PKCS1_V1_5 wrapping algorithm" (PKCS#1 v1.5
# encryption is open to Bleichenbacher's padding oracle); SM2PKE is for China Regions only.
REFUSED_WRAPPING_ALGORITHMS: dict[str, str] = {
    RSAES_PKCS1_V1_5: ("RSAES_PKCS1_V1_5 is deprecated: AWS KMS does not support it for "
                       "importing key material since October 10, 2023; use RSAES_OAEP_SHA_256 "
                       "or RSA_AES_KEY_WRAP_SHA_256"),
    SM2PKE: "SM2PKE is available only in China Regions; kmsd does not implement SM2"}
WRAPPING_KEY_SPECS = tuple(RSA_KEY_SPECS)
KIND_WRAPPING = "wrapping_algorithm"

_OAEP_PARAMS = {"sha1": (Mechanism.SHA_1, MGF.SHA1, None),
                "sha256": (Mechanism.SHA256, MGF.SHA256, None)}
_OAEP_ALGORITHM = {"sha1": "RSAES_OAEP_SHA_1", "sha256": "RSAES_OAEP_SHA_256"}


class ImportRefused(Exception):
    """This token (named in the message) cannot take this wrapping algorithm, or AWS does not
    allow it for this key material (`wrapping_refusal`)."""


@dataclass(frozen=True)
class ImportedMaterial:
    wrapped: bytes       # KWP under the active domain-key generation, tagged
    check_value: str     # hex; see kmsd.hsm.imported_material
    public_key: bytes | None = None  # DER SubjectPublicKeyInfo of an asymmetric key


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


def wrapping_refusal(key_spec: str, wrapping_algorithm: str,
                     wrapping_key_spec: str) -> str | None:
    """Why AWS refuses this wrapping algorithm for this key's material, or None; pure.

    AWS KMS API reference, GetParametersForImport WrappingAlgorithm: "To import an RSA
    private key, you must use an RSA_AES wrapping algorithm"; RSAES_OAEP_SHA_* are
    "Supported for all types of key material, except RSA key material (private key). You
    cannot use the RSAES_OAEP_SHA_* wrapping algorithm with the RSA_2048 wrapping key spec
    to wrap ECC_NIST_P521 key material."
    """
    if wrapping_algorithm not in WRAPPING_ALGORITHMS:
        return None  # import_path answers for unknown and refused algorithms
    _, aes_wrap = WRAPPING_ALGORITHMS[wrapping_algorithm]
    if aes_wrap:
        return None
    if key_spec in RSA_KEY_SPECS:
        return (f"{key_spec} key material is an RSA private key: import it with "
                "RSA_AES_KEY_WRAP_SHA_1 or RSA_AES_KEY_WRAP_SHA_256, not "
                f"{wrapping_algorithm}")
    if key_spec == "ECC_NIST_P521" and wrapping_key_spec == "RSA_2048":
        return (f"ECC_NIST_P521 key material cannot be wrapped directly with an RSA_2048 "
                f"wrapping key and {wrapping_algorithm}: use a larger wrapping key or an "
                "RSA_AES_KEY_WRAP_SHA_* wrapping algorithm")
    return None


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


def _reenter_token(partition: HsmPartition, material: bytearray) -> tuple[Any, bytes]:
    """Host-decoded material back into the token the way RSA_AES_KEY_WRAP_* brings it: under
    a one-time AES key, so that the token parses and types it exactly as on the in-token path
    (a PKCS#8 private key included). Returns (one-time AES handle, KWP of the material)."""
    one_time = bytearray(partition.random(32))
    try:
        wrapped = aes_key_wrap_with_padding(bytes(one_time), bytes(material))
    finally:
        material[:] = bytes(len(material))
    return _create_aes(partition, one_time, {Attribute.UNWRAP: True,
                                            Attribute.EXTRACTABLE: False}), wrapped


def import_material(partition: HsmPartition, path: str, wrapping_algorithm: str,
                    wrapped_wrapping_private: bytes, wrapping_key_spec: str,
                    encrypted_key_material: bytes,
                    key_spec: str = SYMMETRIC_DEFAULT) -> ImportedMaterial:
    """Unwrap a customer's key material for a `key_spec` key with the import's RSA private
    key, in the token; re-wrap it under the domain key (kmsd.hsm.imported_material)."""
    if path not in (IN_TOKEN, RAW_IN_TOKEN_HOST_DECODING):
        raise ImportRefused(f"token {partition.token_label!r} has no path for "
                            f"{wrapping_algorithm}")
    refusal = wrapping_refusal(key_spec, wrapping_algorithm, wrapping_key_spec)
    if refusal is not None:
        raise ImportRefused(refusal)
    into = imported_material.target(key_spec)
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
        if path == IN_TOKEN and aes_wrap:
            # The first RSA block is the ephemeral AES key; the rest is the material under it.
            try:
                ephemeral = wrapping_private.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, head, store=False,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_PARAMS[hash_name],
                    capabilities=MechanismFlag.UNWRAP,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
        elif path == IN_TOKEN:
            try:
                material = wrapping_private.unwrap_key(
                    into.object_class, into.key_type, head, store=False,
                    mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_OAEP_PARAMS[hash_name],
                    capabilities=into.capabilities, template=into.template)
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
        elif aes_wrap:
            ephemeral = _create_aes(partition, _host_oaep(wrapping_private, head, k, hash_name),
                                    {Attribute.UNWRAP: True, Attribute.EXTRACTABLE: False})
        else:
            ephemeral, tail = _reenter_token(partition,
                                             _host_oaep(wrapping_private, head, k, hash_name))
        if material is None:
            try:
                material = ephemeral.unwrap_key(
                    into.object_class, into.key_type, tail, store=False,
                    mechanism=Mechanism.AES_KEY_WRAP_PAD, capabilities=into.capabilities,
                    template=into.template)
            except PKCS11Error:
                raise HsmAuthenticationFailed() from None
        finished = imported_material.finish(partition, key_spec, material)
        return ImportedMaterial(finished.wrapped, finished.check_value, finished.public_key)
    finally:
        for handle in (material, ephemeral, wrapping_private):
            _destroy(handle)
