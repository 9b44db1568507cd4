"""Importing HMAC and asymmetric key material into SoftHSM2 (kmsd.hsm.key_import with
kmsd.hsm.imported_material): material made and wrapped locally with `cryptography`, as
AWS's "Step 3: Encrypt the key material" has customers do with openssl; unwrapped,
checked and re-wrapped in the token.

AWS references: GetParametersForImport WrappingAlgorithm ("To import an RSA private key,
you must use an RSA_AES wrapping algorithm"; RSAES_OAEP_SHA_* cannot wrap ECC_NIST_P521
material under an RSA_2048 wrapping key); "For asymmetric key pairs, encrypt and import
only the private key. AWS KMS derives the public key from the private key."
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsd import domain_blob
from kmsd.hsm import capabilities, key_import
from kmsd.hsm.asymmetric import AsymmetricKeys, GeneratedKey, verify
from kmsd.hsm.capabilities import TokenCapabilities
from kmsd.hsm.imported_material import HMAC_MATERIAL_BYTES, InvalidMaterial
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmPartition
from kmsd.hsm.rewrap import rewrap_key
from tests.unit.hsm.conftest import SoftHsm

_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}
CURVES = {"ECC_NIST_P256": ec.SECP256R1(), "ECC_NIST_P384": ec.SECP384R1(),
          "ECC_NIST_P521": ec.SECP521R1(), "ECC_SECG_P256K1": ec.SECP256K1()}


@pytest.fixture(scope="module")
def caps(hsm_partition: HsmPartition) -> TokenCapabilities:
    return capabilities.probe(hsm_partition)


@pytest.fixture(scope="module")
def keys(hsm_partition: HsmPartition, caps: TokenCapabilities) -> AsymmetricKeys:
    return AsymmetricKeys(hsm_partition, caps)


@pytest.fixture(scope="module")
def wrapping(keys: AsymmetricKeys) -> dict[str, GeneratedKey]:
    return {"RSA_2048": keys.generate("RSA_2048"), "RSA_3072": keys.generate("RSA_3072")}


def pkcs8(private_key: PrivateKeyTypes) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def wrap(public_key_der: bytes | None, algorithm: str, material: bytes) -> bytes:
    assert public_key_der is not None
    public_key = serialization.load_der_public_key(public_key_der)
    assert isinstance(public_key, rsa.RSAPublicKey)
    hash_name, aes_wrap = key_import.WRAPPING_ALGORITHMS[algorithm]
    oaep = padding.OAEP(padding.MGF1(_HASH[hash_name]()), _HASH[hash_name](), None)
    if not aes_wrap:
        return public_key.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public_key.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)


def do_import(partition: HsmPartition, caps: TokenCapabilities, wrapping_key: GeneratedKey,
              algorithm: str, material: bytes, key_spec: str,
              wrapping_key_spec: str = "RSA_2048") -> key_import.ImportedMaterial:
    path, _ = key_import.import_path(caps, algorithm)
    return key_import.import_material(partition, path, algorithm, wrapping_key.wrapped_private,
                                      wrapping_key_spec,
                                      wrap(wrapping_key.public_key_der, algorithm, material),
                                      key_spec)


def test_wrapping_refusals_follow_aws() -> None:
    for spec in ("RSA_2048", "RSA_3072", "RSA_4096"):
        for algorithm in ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"):
            assert key_import.wrapping_refusal(spec, algorithm, "RSA_4096") is not None
        for algorithm in ("RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256"):
            assert key_import.wrapping_refusal(spec, algorithm, "RSA_2048") is None
    assert key_import.wrapping_refusal("ECC_NIST_P521", "RSAES_OAEP_SHA_1", "RSA_2048")
    assert key_import.wrapping_refusal("ECC_NIST_P521", "RSAES_OAEP_SHA_1", "RSA_3072") is None
    assert key_import.wrapping_refusal("ECC_NIST_P521", "RSA_AES_KEY_WRAP_SHA_1",
                                       "RSA_2048") is None
    for spec in ("SYMMETRIC_DEFAULT", "HMAC_256", "ECC_NIST_P256", "ECC_SECG_P256K1"):
        assert key_import.wrapping_refusal(spec, "RSAES_OAEP_SHA_256", "RSA_2048") is None


def test_pkcs1_v1_5_is_refused_everywhere(hsm_partition: HsmPartition,
                                         caps: TokenCapabilities,
                                         wrapping: dict[str, GeneratedKey]) -> None:
    """AWS: "RSAES_PKCS1_V1_5 (Deprecated) -- As of October 10, 2023, KMS does not support
    the RSAES_PKCS1_V1_5 wrapping algorithm": not on this token, not by operator choice."""
    for allow in (False, True):
        path, detail = key_import.import_path(caps, "RSAES_PKCS1_V1_5", allow)
        assert path == capabilities.UNSUPPORTED and "October 10, 2023" in detail
    for key_spec in ("SYMMETRIC_DEFAULT", "HMAC_256", "ECC_NIST_P256", "RSA_2048"):
        with pytest.raises(key_import.ImportRefused):
            key_import.import_material(hsm_partition, path, "RSAES_PKCS1_V1_5",
                                       wrapping["RSA_2048"].wrapped_private, "RSA_2048",
                                       os.urandom(256), key_spec)


@pytest.mark.parametrize("algorithm", list(key_import.WRAPPING_ALGORITHMS))
@pytest.mark.parametrize("key_spec", ["HMAC_224", "HMAC_512"])
def test_hmac_import(hsm_partition: HsmPartition, caps: TokenCapabilities,
                     keys: AsymmetricKeys, wrapping: dict[str, GeneratedKey],
                     algorithm: str, key_spec: str) -> None:
    low, high = HMAC_MATERIAL_BYTES[key_spec]
    hash_name = {"HMAC_224": "sha224", "HMAC_512": "sha512"}[key_spec]
    for length in (low, high):
        material = os.urandom(length)
        first = do_import(hsm_partition, caps, wrapping["RSA_2048"], algorithm, material,
                          key_spec)
        again = do_import(hsm_partition, caps, wrapping["RSA_2048"], algorithm, material,
                          key_spec)
        assert first.public_key is None and first.check_value == again.check_value
        assert material not in first.wrapped
        mac = keys.generate_mac(first.wrapped, key_spec, f"HMAC_SHA_{key_spec[5:]}", b"msg")
        assert mac == hmac.new(material, b"msg", hash_name).digest()


def test_hmac_material_out_of_range(hsm_partition: HsmPartition, caps: TokenCapabilities,
                                    wrapping: dict[str, GeneratedKey]) -> None:
    for key_spec, length in (("HMAC_256", 31), ("HMAC_256", 65), ("HMAC_512", 63),
                             ("HMAC_512", 129)):
        with pytest.raises(InvalidMaterial):
            do_import(hsm_partition, caps, wrapping["RSA_2048"], "RSA_AES_KEY_WRAP_SHA_1",
                      os.urandom(length), key_spec)


@pytest.mark.parametrize("key_spec", list(CURVES))
def test_ec_import_derives_the_public_key(hsm_partition: HsmPartition,
                                          caps: TokenCapabilities, keys: AsymmetricKeys,
                                          wrapping: dict[str, GeneratedKey],
                                          key_spec: str) -> None:
    private_key = ec.generate_private_key(CURVES[key_spec])
    expected = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # RSA_2048 + RSAES_OAEP cannot carry a P-521 PKCS#8 (AWS refuses it too): RSA_3072.
    wrapping_spec = "RSA_3072" if key_spec == "ECC_NIST_P521" else "RSA_2048"
    for algorithm in key_import.WRAPPING_ALGORITHMS:
        imported = do_import(hsm_partition, caps, wrapping[wrapping_spec], algorithm,
                             pkcs8(private_key), key_spec, wrapping_spec)
        assert imported.public_key == expected
        assert imported.check_value == hashlib.sha256(expected).hexdigest()
    algorithm = capabilities.SIGNING_ALGORITHMS[key_spec][0]
    signature = keys.sign(imported.wrapped, key_spec, algorithm, b"hello", "RAW")
    hash_name = capabilities.ALGORITHM_HASH[algorithm]
    private_key.public_key().verify(signature, b"hello",
                                    ec.ECDSA(capabilities.CRYPTOGRAPHY_HASH[hash_name]()))


def test_rsa_import(hsm_partition: HsmPartition, caps: TokenCapabilities,
                    keys: AsymmetricKeys, wrapping: dict[str, GeneratedKey]) -> None:
    private_key = rsa.generate_private_key(65537, 2048)
    expected = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    for algorithm in ("RSA_AES_KEY_WRAP_SHA_1", "RSA_AES_KEY_WRAP_SHA_256"):
        imported = do_import(hsm_partition, caps, wrapping["RSA_2048"], algorithm,
                             pkcs8(private_key), "RSA_2048")
        assert imported.public_key == expected
    signature = keys.sign(imported.wrapped, "RSA_2048", "RSASSA_PSS_SHA_256", b"m", "RAW")
    assert verify(expected, "RSASSA_PSS_SHA_256", b"m", "RAW", signature)
    ciphertext = private_key.public_key().encrypt(
        b"secret", padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None))
    assert keys.decrypt(imported.wrapped, "RSA_2048", "RSAES_OAEP_SHA_1", ciphertext) == \
        b"secret"
    # RSAES_OAEP_* is what AWS refuses for RSA material, before anything is unwrapped.
    with pytest.raises(key_import.ImportRefused):
        key_import.import_material(hsm_partition, "in-token", "RSAES_OAEP_SHA_1",
                                   wrapping["RSA_2048"].wrapped_private, "RSA_2048",
                                   os.urandom(256), "RSA_2048")


def test_material_of_another_kind_is_refused(hsm_partition: HsmPartition,
                                             caps: TokenCapabilities,
                                             wrapping: dict[str, GeneratedKey]) -> None:
    p256 = pkcs8(ec.generate_private_key(ec.SECP256R1()))
    rsa2048 = pkcs8(rsa.generate_private_key(65537, 2048))
    for material, key_spec in ((p256, "ECC_NIST_P384"), (p256, "ECC_SECG_P256K1"),
                               (rsa2048, "RSA_3072")):
        with pytest.raises((InvalidMaterial, HsmAuthenticationFailed)):
            do_import(hsm_partition, caps, wrapping["RSA_2048"], "RSA_AES_KEY_WRAP_SHA_1",
                      material, key_spec)
    # An EC key where an RSA key belongs: the token refuses to parse it as RSA.
    with pytest.raises((InvalidMaterial, HsmAuthenticationFailed)):
        do_import(hsm_partition, caps, wrapping["RSA_2048"], "RSA_AES_KEY_WRAP_SHA_1", p256,
                  "RSA_2048")


_P256_DER = pkcs8(ec.generate_private_key(ec.SECP256R1()))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.tuples(st.integers(0, len(_P256_DER) - 1), st.integers(1, 255)).map(
        lambda flip: _P256_DER[:flip[0]] + bytes([_P256_DER[flip[0]] ^ flip[1]])
        + _P256_DER[flip[0] + 1:]),
    st.integers(1, len(_P256_DER) - 1).map(lambda cut: _P256_DER[:cut]),
    st.binary(min_size=1, max_size=200)))
def test_damaged_pkcs8_is_refused_or_consistent(hsm_partition: HsmPartition,
                                                caps: TokenCapabilities,
                                                keys: AsymmetricKeys,
                                                wrapping: dict[str, GeneratedKey],
                                                material: bytes) -> None:
    """Whatever DER the token is handed, import refuses it with one of two errors, or
    returns a key whose public key really belongs to the private key it re-wrapped."""
    try:
        imported = do_import(hsm_partition, caps, wrapping["RSA_2048"],
                             "RSA_AES_KEY_WRAP_SHA_1", material, "ECC_NIST_P256")
    except (InvalidMaterial, HsmAuthenticationFailed):
        return
    assert imported.public_key is not None
    signature = keys.sign(imported.wrapped, "ECC_NIST_P256", "ECDSA_SHA_256", b"x", "RAW")
    assert verify(imported.public_key, "ECDSA_SHA_256", b"x", "RAW", signature)


def test_imported_material_is_wrapped_under_the_active_generation_and_rewraps(
        softhsm: SoftHsm) -> None:
    """Every kind of imported material (and the import's wrapping key) is tagged with the
    domain-key generation it is wrapped under, so a rotation finds it, re-wraps it like a
    generated key of the same spec (kmsd.hsm.rewrap), and it works once the old generation
    is destroyed."""
    hsm = softhsm.open_partition(softhsm.new_token("import-gen"))
    try:
        active = [1]
        hsm.generation_source = lambda: active[0]
        token_caps = capabilities.probe(hsm)
        wrapping_key = AsymmetricKeys(hsm, token_caps).generate("RSA_2048")
        aes, hmac_key = os.urandom(32), os.urandom(64)
        p256, rsa2048 = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(
            65537, 2048)
        materials = {"SYMMETRIC_DEFAULT": aes, "HMAC_256": hmac_key,
                     "ECC_NIST_P256": pkcs8(p256), "RSA_2048": pkcs8(rsa2048)}

        def import_all() -> dict[str, key_import.ImportedMaterial]:
            return {spec: do_import(hsm, token_caps, wrapping_key, "RSA_AES_KEY_WRAP_SHA_1",
                                    material, spec) for spec, material in materials.items()}

        old = import_all()
        assert {domain_blob.wrap_generation(m.wrapped) for m in old.values()} == {1}
        hsm.create_domain_key(2)
        active[0] = 2
        # Imported while generation 2 is active: tagged with it, and the same material.
        new = import_all()
        assert {domain_blob.wrap_generation(m.wrapped) for m in new.values()} == {2}
        assert {s: m.check_value for s, m in new.items()} == \
            {s: m.check_value for s, m in old.items()}

        rewrapped = {spec: rewrap_key(hsm, m.wrapped, spec) for spec, m in old.items()}
        wrapping_key = GeneratedKey("RSA_2048",
                                    rewrap_key(hsm, wrapping_key.wrapped_private, "RSA_2048"),
                                    wrapping_key.public_key_der)
        assert {domain_blob.wrap_generation(b) for b in rewrapped.values()} == {2}
        assert hsm.destroy_generation(1)

        keys = AsymmetricKeys(hsm, token_caps)  # no handle cached under generation 1
        nonce = hsm.random(12)
        for blobs in ({s: m.wrapped for s, m in new.items()}, rewrapped):
            sealed = hsm.encrypt_gcm(blobs["SYMMETRIC_DEFAULT"], nonce, b"", b"x")
            assert hsm.decrypt_gcm(new["SYMMETRIC_DEFAULT"].wrapped, nonce, b"", sealed) == b"x"
            assert keys.generate_mac(blobs["HMAC_256"], "HMAC_256", "HMAC_SHA_256", b"m") == \
                hmac.new(hmac_key, b"m", "sha256").digest()
            for spec, algorithm in (("ECC_NIST_P256", "ECDSA_SHA_256"),
                                    ("RSA_2048", "RSASSA_PSS_SHA_256")):
                signature = keys.sign(blobs[spec], spec, algorithm, b"m", "RAW")
                assert verify(new[spec].public_key, algorithm, b"m", "RAW", signature)
        # The re-wrapped import wrapping key still takes material.
        assert domain_blob.wrap_generation(import_all()["HMAC_256"].wrapped) == 2
    finally:
        hsm.close()
