"""kmsd.service.key_specs: the KeyUsage / KeySpec table, the algorithm lists of KeyMetadata,
and the AWS error forms -- pure, no HSM.

Each expectation cites the AWS KMS API reference it checks.
"""

from __future__ import annotations

import pytest

from kmsd.errors import InvalidKeyUsageException, ValidationException
from kmsd.hsm.capabilities import KEY_SPECS
from kmsd.service import key_specs
from kmsd.service.key_specs import algorithm_lists, key_usage_for
from kmsd.service.rsa_encryption import max_plaintext_bytes

ALL_USAGES = ("ENCRYPT_DECRYPT", "SIGN_VERIFY", "GENERATE_VERIFY_MAC", "KEY_AGREEMENT",
              "ENCAPSULATE_DECAPSULATE")

# CreateKey, KeyUsage: "Select only one valid value." followed by the list per key type.
EXPECTED_USAGES = {
    "SYMMETRIC_DEFAULT": {"ENCRYPT_DECRYPT"},
    "RSA_2048": {"ENCRYPT_DECRYPT", "SIGN_VERIFY"},
    "RSA_3072": {"ENCRYPT_DECRYPT", "SIGN_VERIFY"},
    "RSA_4096": {"ENCRYPT_DECRYPT", "SIGN_VERIFY"},
    "ECC_NIST_P256": {"SIGN_VERIFY", "KEY_AGREEMENT"},
    "ECC_NIST_P384": {"SIGN_VERIFY", "KEY_AGREEMENT"},
    "ECC_NIST_P521": {"SIGN_VERIFY", "KEY_AGREEMENT"},
    "ECC_SECG_P256K1": {"SIGN_VERIFY"},
    "ECC_NIST_EDWARDS25519": {"SIGN_VERIFY"},
    "HMAC_224": {"GENERATE_VERIFY_MAC"}, "HMAC_256": {"GENERATE_VERIFY_MAC"},
    "HMAC_384": {"GENERATE_VERIFY_MAC"}, "HMAC_512": {"GENERATE_VERIFY_MAC"},
    "ML_DSA_44": {"SIGN_VERIFY"}, "ML_DSA_65": {"SIGN_VERIFY"}, "ML_DSA_87": {"SIGN_VERIFY"},
    "ML_KEM_512": {"ENCAPSULATE_DECAPSULATE"}, "ML_KEM_768": {"ENCAPSULATE_DECAPSULATE"},
    "ML_KEM_1024": {"ENCAPSULATE_DECAPSULATE"},
    "SM2": {"ENCRYPT_DECRYPT", "SIGN_VERIFY", "KEY_AGREEMENT"},
}


def test_every_key_spec_of_the_model_has_a_usage_row() -> None:
    assert set(key_specs.KEY_USAGES) == {"SYMMETRIC_DEFAULT", *KEY_SPECS}
    assert {spec: set(usages) for spec, usages in key_specs.KEY_USAGES.items()} == \
        EXPECTED_USAGES


@pytest.mark.parametrize("key_spec", sorted(EXPECTED_USAGES))
@pytest.mark.parametrize("key_usage", ALL_USAGES)
def test_key_usage_compatibility(key_spec: str, key_usage: str) -> None:
    if key_usage in EXPECTED_USAGES[key_spec]:
        assert key_usage_for(key_spec, key_usage) == key_usage
    else:
        with pytest.raises(ValidationException) as excinfo:
            key_usage_for(key_spec, key_usage)
        assert excinfo.value.message == \
            f"KeyUsage {key_usage} is not compatible with KeySpec {key_spec}"


def test_key_usage_is_required_except_for_symmetric_keys() -> None:
    # CreateKey, KeyUsage: "This parameter is optional when you are creating a symmetric
    # encryption KMS key; otherwise, it is required."
    assert key_usage_for("SYMMETRIC_DEFAULT", None) == "ENCRYPT_DECRYPT"
    for key_spec in ("RSA_2048", "ECC_NIST_P256", "HMAC_256"):
        with pytest.raises(ValidationException, match="You must specify a KeyUsage value"):
            key_usage_for(key_spec, None)


@pytest.mark.parametrize(("key_spec", "key_usage", "expected"), [
    ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", {"EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"]}),
    ("RSA_2048", "ENCRYPT_DECRYPT",
     {"EncryptionAlgorithms": ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]}),
    ("RSA_4096", "SIGN_VERIFY", {"SigningAlgorithms": [
        "RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512",
        "RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512"]}),
    ("ECC_NIST_P256", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_256"]}),
    ("ECC_NIST_P384", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_384"]}),
    ("ECC_NIST_P521", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_512"]}),
    ("ECC_SECG_P256K1", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_256"]}),
    ("ECC_NIST_P521", "KEY_AGREEMENT", {"KeyAgreementAlgorithms": ["ECDH"]}),
    ("HMAC_224", "GENERATE_VERIFY_MAC", {"MacAlgorithms": ["HMAC_SHA_224"]}),
    ("HMAC_512", "GENERATE_VERIFY_MAC", {"MacAlgorithms": ["HMAC_SHA_512"]}),
])
def test_metadata_has_only_the_algorithm_list_of_the_usage(
        key_spec: str, key_usage: str, expected: dict[str, list[str]]) -> None:
    assert algorithm_lists(key_spec, key_usage) == expected


@pytest.mark.parametrize(("key_spec", "algorithm", "limit"), [
    # Encrypt, Plaintext: "RSA_2048 RSAES_OAEP_SHA_1: 214 bytes, RSAES_OAEP_SHA_256: 190 ...
    # RSA_3072 ... 342 / 318 ... RSA_4096 ... 470 / 446".
    ("RSA_2048", "RSAES_OAEP_SHA_1", 214), ("RSA_2048", "RSAES_OAEP_SHA_256", 190),
    ("RSA_3072", "RSAES_OAEP_SHA_1", 342), ("RSA_3072", "RSAES_OAEP_SHA_256", 318),
    ("RSA_4096", "RSAES_OAEP_SHA_1", 470), ("RSA_4096", "RSAES_OAEP_SHA_256", 446),
])
def test_rsa_plaintext_limits(key_spec: str, algorithm: str, limit: int) -> None:
    assert max_plaintext_bytes(key_spec, algorithm) == limit


def test_error_forms() -> None:
    arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    usage = key_specs.wrong_usage(arn, "SIGN_VERIFY", "Encrypt")
    assert isinstance(usage, InvalidKeyUsageException)
    assert usage.message == f"{arn} key usage is SIGN_VERIFY which is not valid for Encrypt."
    algorithm = key_specs.wrong_algorithm("ECDSA_SHA_384", "ECC_NIST_P256")
    assert isinstance(algorithm, InvalidKeyUsageException)
    assert algorithm.message == "Algorithm ECDSA_SHA_384 is incompatible with key spec " \
        "ECC_NIST_P256."
