"""What imported key material must be for each KMS key spec, checked inside the token.

Hazmat: kmsd.hsm.key_import calls this module once the customer's material is a session
object in the token. It owns, per KeySpec:

- the object the material is unwrapped into (class, key type, capabilities): an AES key
  (SYMMETRIC_DEFAULT), a generic secret (HMAC_*), or a private key parsed by the token
  from the customer's PKCS#8 DER (RSA_*, ECC_NIST_P256/384/521, ECC_SECG_P256K1);
- `finish`: the checks AWS makes of imported material (AWS KMS developer guide,
  "Requirements for imported key material" and "Step 3: Encrypt the key material": for
  asymmetric key pairs only the private key is imported and "AWS KMS derives the public
  key from the private key"), the re-wrap under the active domain-key generation (tagged
  with it like every blob in the state, kmsd.domain_blob, so that a domain-key rotation
  finds and re-wraps it), a key check value and, for asymmetric keys, the DER
  SubjectPublicKeyInfo.

How the public key is derived without the private key leaving the token: RSA private
key objects carry CKA_MODULUS and CKA_PUBLIC_EXPONENT. EC private key objects carry no
point (SoftHSM2 2.6.1: CKA_EC_POINT is AttributeTypeInvalid on a private key), so the
token computes ECDH with the curve's generator G -- Z is the x-coordinate of d*G, the
public point -- and a signature made in the token picks which of the two points with
that x it is. Every asymmetric import ends with that pairwise consistency check: a
signature from the token verified on the host with the derived public key.

The check value that lets the state machine refuse different material on re-import:
AES-CMAC (symmetric) or HMAC (HMAC keys) of a constant, computed in the token; for
asymmetric keys, SHA-256 of the public key, which determines the private key.

Material of the wrong kind or size raises `InvalidMaterial` (AWS answers
IncorrectKeyMaterialException); nothing here logs, returns or raises with key material.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import KDF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import KeySizeRange, PKCS11Error
from pkcs11.util.ec import encode_ecdsa_signature, encode_named_curve_parameters

from kmsd import domain_blob
from kmsd.hsm.capabilities import (
    EC_KEY_SPECS,
    HMAC_KEY_SPECS,
    HMAC_MECHANISM,
    PRIVATE_UNWRAP_FIX,
    RSA_KEY_SPECS,
)
from kmsd.hsm.partition import HsmError, HsmPartition, NoDomainKey

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
IMPORTABLE_KEY_SPECS: tuple[str, ...] = (SYMMETRIC_DEFAULT, *HMAC_KEY_SPECS, *RSA_KEY_SPECS,
                                         *EC_KEY_SPECS)
# HMAC key material lengths in bytes (AWS KMS developer guide, "Requirements for imported
# key material"): at least the hash's output, at most its block size. The token itself
# refuses keys shorter than the output (CKR_KEY_SIZE_RANGE); the longest is checked here.
HMAC_MATERIAL_BYTES: dict[str, tuple[int, int]] = {
    "HMAC_224": (28, 64), "HMAC_256": (32, 64), "HMAC_384": (48, 128), "HMAC_512": (64, 128)}
_HMAC_HASH = {"HMAC_224": "sha224", "HMAC_256": "sha256", "HMAC_384": "sha384",
              "HMAC_512": "sha512"}
# What the check values are MACs of; changing them changes every stored check value.
CHECK_VALUE_INPUT = b"kmsd imported key material check"
_PAIRWISE_DIGEST = hashlib.sha256(b"kmsd imported key pairwise consistency").digest()
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
AES_256_WRAPPED_BYTES = 40  # CKM_AES_KEY_WRAP_PAD of a 32-byte key
_CURVES: dict[str, ec.EllipticCurve] = {
    "ECC_NIST_P256": ec.SECP256R1(), "ECC_NIST_P384": ec.SECP384R1(),
    "ECC_NIST_P521": ec.SECP521R1(), "ECC_SECG_P256K1": ec.SECP256K1()}


class InvalidMaterial(Exception):
    """The unwrapped material is not what the key spec needs. No key material inside."""


@dataclass(frozen=True)
class Target:
    """The token object the material is unwrapped into."""

    object_class: ObjectClass
    key_type: KeyType
    capabilities: MechanismFlag
    template: dict[Attribute, Any]


@dataclass(frozen=True)
class Finished:
    wrapped: bytes                 # KWP under the active domain-key generation, tagged
    check_value: str               # hex
    public_key: bytes | None       # DER SubjectPublicKeyInfo of an asymmetric key


def is_asymmetric(key_spec: str) -> bool:
    return key_spec in RSA_KEY_SPECS or key_spec in EC_KEY_SPECS


def target(key_spec: str) -> Target:
    """What to unwrap the customer's material into. Extractable only so that the domain
    key can wrap it; sensitive, so that its value is never readable."""
    secret = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True}
    if key_spec == SYMMETRIC_DEFAULT:
        return Target(ObjectClass.SECRET_KEY, KeyType.AES,
                      MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT | MechanismFlag.SIGN, secret)
    if key_spec in HMAC_KEY_SPECS:
        return Target(ObjectClass.SECRET_KEY, KeyType.GENERIC_SECRET, MechanismFlag.SIGN,
                      secret)
    if key_spec in RSA_KEY_SPECS:
        return Target(ObjectClass.PRIVATE_KEY, KeyType.RSA,
                      MechanismFlag.SIGN | MechanismFlag.DECRYPT,
                      {**PRIVATE_UNWRAP_FIX, **secret})
    if key_spec in EC_KEY_SPECS:
        # DERIVE: the public point is computed by ECDH with the generator (module docstring).
        return Target(ObjectClass.PRIVATE_KEY, KeyType.EC,
                      MechanismFlag.SIGN | MechanismFlag.DERIVE,
                      {**PRIVATE_UNWRAP_FIX, **secret})
    raise InvalidMaterial(f"kmsd does not import key material for {key_spec} keys")


def finish(partition: HsmPartition, key_spec: str, material: Any) -> Finished:
    """Check the unwrapped material for `key_spec`, re-wrap it under the domain key and
    compute its check value (and public key). `material` stays the caller's to destroy."""
    if key_spec == SYMMETRIC_DEFAULT:
        wrapped = _wrap(partition, material)
        if len(domain_blob.split_wrap(wrapped)[1]) != AES_256_WRAPPED_BYTES:
            raise InvalidMaterial("SYMMETRIC_DEFAULT key material must be 256 bits")
        return Finished(wrapped, _mac(material, Mechanism.AES_CMAC), None)
    if key_spec in HMAC_KEY_SPECS:
        wrapped = _wrap(partition, material)
        low, high = HMAC_MATERIAL_BYTES[key_spec]
        # KWP output is 8 bytes of integrity block plus the key padded to a multiple of 8;
        # both bounds are multiples of 8, so the longest key is exact here.
        if len(domain_blob.split_wrap(wrapped)[1]) > high + 8:
            raise InvalidMaterial(f"{key_spec} key material must be {low} to {high} bytes")
        try:
            check = _mac(material, HMAC_MECHANISM[_HMAC_HASH[key_spec]])
        except KeySizeRange:
            raise InvalidMaterial(
                f"{key_spec} key material must be {low} to {high} bytes") from None
        return Finished(wrapped, check, None)
    if key_spec in RSA_KEY_SPECS:
        public_key = _rsa_public_key(material, key_spec)
    else:
        public_key = _ec_public_key(material, key_spec)
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return Finished(_wrap(partition, material), hashlib.sha256(spki).hexdigest(), spki)


# -- helpers -----------------------------------------------------------------------------

def _wrap(partition: HsmPartition, material: Any) -> bytes:
    try:
        return partition.wrap(material)
    except (PKCS11Error, NoDomainKey):
        raise HsmError("the token could not re-wrap the imported key material") from None


def _mac(material: Any, mechanism: Mechanism) -> str:
    try:
        return bytes(material.sign(CHECK_VALUE_INPUT, mechanism=mechanism)).hex()
    except KeySizeRange:
        raise
    except PKCS11Error:
        raise HsmError("the token could not compute the imported key's check value") from None


def _rsa_public_key(material: Any, key_spec: str) -> rsa.RSAPublicKey:
    try:
        modulus = int.from_bytes(material[Attribute.MODULUS], "big")
        exponent = int.from_bytes(material[Attribute.PUBLIC_EXPONENT], "big")
    except PKCS11Error:
        raise InvalidMaterial(f"the key material is not an {key_spec} private key") from None
    if modulus.bit_length() != RSA_KEY_SPECS[key_spec] or exponent < 3:
        raise InvalidMaterial(f"the key material is not an {key_spec} private key")
    public_key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    try:
        signature = bytes(material.sign(_SHA256_DIGEST_INFO + _PAIRWISE_DIGEST,
                                        mechanism=Mechanism.RSA_PKCS))
        public_key.verify(signature, _PAIRWISE_DIGEST, padding.PKCS1v15(),
                          Prehashed(hashes.SHA256()))
    except (PKCS11Error, InvalidSignature):
        raise InvalidMaterial(f"the key material is not a consistent {key_spec} private key"
                              ) from None
    return public_key


def _ec_public_key(material: Any, key_spec: str) -> ec.EllipticCurvePublicKey:
    curve = _CURVES[key_spec]
    not_this = f"the key material is not an {key_spec} private key"
    try:
        params = bytes(material[Attribute.EC_PARAMS])
    except PKCS11Error:
        raise InvalidMaterial(not_this) from None
    if params != encode_named_curve_parameters(EC_KEY_SPECS[key_spec]):
        raise InvalidMaterial(not_this)
    size = (curve.key_size + 7) // 8
    generator = ec.derive_private_key(1, curve).public_key().public_bytes(
        Encoding.X962, PublicFormat.UncompressedPoint)
    try:
        # Z = x(d*G): public information, so the derived object may be read.
        x = material.derive_key(
            KeyType.GENERIC_SECRET, size * 8, store=False, mechanism=Mechanism.ECDH1_DERIVE,
            mechanism_param=(KDF.NULL, None, generator),
            template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        try:
            x_bytes = bytes(x[Attribute.VALUE]).rjust(size, b"\x00")
        finally:
            x.destroy()
        signature = encode_ecdsa_signature(bytes(material.sign(_PAIRWISE_DIGEST,
                                                               mechanism=Mechanism.ECDSA)))
    except PKCS11Error:
        raise InvalidMaterial(not_this) from None
    for prefix in (b"\x02", b"\x03"):
        try:
            candidate = ec.EllipticCurvePublicKey.from_encoded_point(curve, prefix + x_bytes)
            candidate.verify(signature, _PAIRWISE_DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))
        except (ValueError, InvalidSignature):
            continue
        return candidate
    raise InvalidMaterial(f"the key material is not a consistent {key_spec} private key")
