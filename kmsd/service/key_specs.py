"""The KMS vocabulary of key specs as the API shows it: which KeyUsage a KeySpec allows, the
algorithm lists of KeyMetadata / GetPublicKey, and the AWS error forms for a key used the
wrong way.

Pure: no I/O, no HSM. What the *token* can do is kmsd.hsm.capabilities' business; this module
says what AWS KMS allows, so a request is refused the way AWS refuses it before the token is
asked at all.

Sources: AWS KMS API reference, CreateKey `KeyUsage` ("For asymmetric KMS keys with RSA key
pairs, specify ENCRYPT_DECRYPT or SIGN_VERIFY. For ... NIST-recommended elliptic curve key
pairs, specify SIGN_VERIFY or KEY_AGREEMENT. For ... ECC_SECG_P256K1 key pairs, specify
SIGN_VERIFY. ... ML-DSA ..., SIGN_VERIFY. ... SM2 ..., ENCRYPT_DECRYPT, SIGN_VERIFY, or
KEY_AGREEMENT"; "This parameter is optional when you are creating a symmetric encryption KMS
key; otherwise, it is required") and the developer guide's key spec reference.
"""

from __future__ import annotations

from cluster.state import KeyRecord
from kmsd.errors import InvalidKeyUsageException, ValidationException
from kmsd.hsm.capabilities import (
    EC_KEY_SPECS,
    ED25519_KEY_SPEC,
    ED25519_PH_SHA_512,
    ED25519_SHA_512,
    HMAC_KEY_SPECS,
    KEY_AGREEMENT_KEY_SPECS,
    MAC_ALGORITHMS,
    ML_DSA_KEY_SPECS,
    ML_KEM_KEY_SPECS,
    RSA_KEY_SPECS,
    RSASSA_PKCS1,
    RSASSA_PSS,
    SM2_KEY_SPEC,
)

SYMMETRIC_DEFAULT = "SYMMETRIC_DEFAULT"
ENCRYPT_DECRYPT = "ENCRYPT_DECRYPT"
SIGN_VERIFY = "SIGN_VERIFY"
GENERATE_VERIFY_MAC = "GENERATE_VERIFY_MAC"
KEY_AGREEMENT = "KEY_AGREEMENT"
ENCAPSULATE_DECAPSULATE = "ENCAPSULATE_DECAPSULATE"
ECDH = "ECDH"
RSAES_OAEP_SHA_1 = "RSAES_OAEP_SHA_1"
RSAES_OAEP_SHA_256 = "RSAES_OAEP_SHA_256"

# KeyUsage values AWS accepts per KeySpec.
KEY_USAGES: dict[str, tuple[str, ...]] = {
    SYMMETRIC_DEFAULT: (ENCRYPT_DECRYPT,),
    **{spec: (ENCRYPT_DECRYPT, SIGN_VERIFY) for spec in RSA_KEY_SPECS},
    **{spec: (SIGN_VERIFY, KEY_AGREEMENT) for spec in KEY_AGREEMENT_KEY_SPECS},
    "ECC_SECG_P256K1": (SIGN_VERIFY,),
    ED25519_KEY_SPEC: (SIGN_VERIFY,),
    **{spec: (GENERATE_VERIFY_MAC,) for spec in HMAC_KEY_SPECS},
    **{spec: (SIGN_VERIFY,) for spec in ML_DSA_KEY_SPECS},
    **{spec: (ENCAPSULATE_DECAPSULATE,) for spec in ML_KEM_KEY_SPECS},
    SM2_KEY_SPEC: (ENCRYPT_DECRYPT, SIGN_VERIFY, KEY_AGREEMENT),
}

# The lists in the order AWS returns them in KeyMetadata and GetPublicKey.
_ENCRYPTION_ALGORITHMS: dict[str, list[str]] = {
    SYMMETRIC_DEFAULT: [SYMMETRIC_DEFAULT],
    **{spec: [RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256] for spec in RSA_KEY_SPECS},
    SM2_KEY_SPEC: ["SM2PKE"],
}
_SIGNING_ALGORITHMS: dict[str, list[str]] = {
    **{spec: [*RSASSA_PKCS1, *RSASSA_PSS] for spec in RSA_KEY_SPECS},
    "ECC_NIST_P256": ["ECDSA_SHA_256"], "ECC_NIST_P384": ["ECDSA_SHA_384"],
    "ECC_NIST_P521": ["ECDSA_SHA_512"], "ECC_SECG_P256K1": ["ECDSA_SHA_256"],
    ED25519_KEY_SPEC: [ED25519_SHA_512, ED25519_PH_SHA_512],
    **{spec: ["ML_DSA_SHAKE_256"] for spec in ML_DSA_KEY_SPECS},
    SM2_KEY_SPEC: ["SM2DSA"],
}


def is_asymmetric(key_spec: str) -> bool:
    """A key pair: RSA, ECC, Ed25519, ML-DSA, ML-KEM, SM2 (not symmetric, not HMAC)."""
    return key_spec != SYMMETRIC_DEFAULT and key_spec not in HMAC_KEY_SPECS


def is_rsa(key_spec: str) -> bool:
    return key_spec in RSA_KEY_SPECS


def key_usage_for(key_spec: str, requested: str | None) -> str:
    """The KeyUsage a CreateKey request gets, or the ValidationException AWS answers."""
    allowed = KEY_USAGES[key_spec]
    if requested is None:
        if key_spec == SYMMETRIC_DEFAULT:
            return ENCRYPT_DECRYPT
        raise ValidationException("You must specify a KeyUsage value for all KMS keys except "
                                  "for symmetric encryption keys.")
    if requested not in allowed:
        raise ValidationException(f"KeyUsage {requested} is not compatible with KeySpec "
                                  f"{key_spec}")
    return requested


def algorithm_lists(key_spec: str, key_usage: str) -> dict[str, list[str]]:
    """The algorithm members of KeyMetadata and GetPublicKey: only the one that fits the
    key's usage, as AWS returns them."""
    if key_usage == ENCRYPT_DECRYPT:
        return {"EncryptionAlgorithms": list(_ENCRYPTION_ALGORITHMS.get(key_spec, []))}
    if key_usage == SIGN_VERIFY:
        return {"SigningAlgorithms": list(_SIGNING_ALGORITHMS.get(key_spec, []))}
    if key_usage == GENERATE_VERIFY_MAC:
        return {"MacAlgorithms": list(MAC_ALGORITHMS.get(key_spec, ()))}
    if key_usage == KEY_AGREEMENT:
        return {"KeyAgreementAlgorithms": [ECDH]}
    return {}


def encryption_algorithms(key_spec: str) -> list[str]:
    return list(_ENCRYPTION_ALGORITHMS.get(key_spec, []))


def signing_algorithms(key_spec: str) -> list[str]:
    return list(_SIGNING_ALGORITHMS.get(key_spec, []))


def curve_of(key_spec: str) -> str | None:
    return EC_KEY_SPECS.get(key_spec)


# -- AWS error forms ---------------------------------------------------------------------------

def wrong_usage(arn: str, key_usage: str, operation: str) -> InvalidKeyUsageException:
    """AWS: "<key ARN> key usage is SIGN_VERIFY which is not valid for Encrypt." """
    return InvalidKeyUsageException(f"{arn} key usage is {key_usage} which is not valid for "
                                    f"{operation}.")


def wrong_key_spec(arn: str, key_spec: str, operation: str) -> InvalidKeyUsageException:
    """The usage fits but the kind of key does not (GenerateDataKey with an RSA key)."""
    return InvalidKeyUsageException(f"{arn} key KeySpec is {key_spec} which is not valid for "
                                    f"{operation}.")


def wrong_algorithm(algorithm: str, key_spec: str) -> InvalidKeyUsageException:
    """AWS: "Algorithm ECDSA_SHA_384 is incompatible with key spec ECC_NIST_P256." """
    return InvalidKeyUsageException(f"Algorithm {algorithm} is incompatible with key spec "
                                    f"{key_spec}.")


def require_usage(record: KeyRecord, key_usage: str, operation: str) -> None:
    if record.key_usage != key_usage:
        raise wrong_usage(record.arn, record.key_usage, operation)
