"""kmsd.hsm.key_import on SoftHSM2: every wrapping algorithm, wrapped locally with
`cryptography` the way AWS's documentation tells customers to (openssl pkeyutl
equivalents), unwrapped in the token and re-wrapped under the domain key."""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from cryptography.hazmat.primitives.serialization import load_der_public_key

from kmsd.hsm import capabilities, key_import
from kmsd.hsm.asymmetric import AsymmetricKeys, GeneratedKey
from kmsd.hsm.capabilities import (
    IN_TOKEN,
    RAW_IN_TOKEN_HOST_DECODING,
    UNSUPPORTED,
    TokenCapabilities,
)
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmPartition

_HASH = {"sha1": hashes.SHA1, "sha256": hashes.SHA256}


@pytest.fixture(scope="module")
def caps(hsm_partition: HsmPartition) -> TokenCapabilities:
    return capabilities.probe(hsm_partition)


@pytest.fixture(scope="module")
def wrapping_key(hsm_partition: HsmPartition, caps: TokenCapabilities) -> GeneratedKey:
    keys = AsymmetricKeys(hsm_partition, caps)
    try:
        return keys.generate("RSA_2048")
    finally:
        keys.close()


def wrap(public_key_der: bytes, algorithm: str, material: bytes) -> bytes:
    """What a customer does with GetParametersForImport's PublicKey."""
    public_key = load_der_public_key(public_key_der)
    hash_name, aes_wrap = key_import.WRAPPING_ALGORITHMS[algorithm]
    h = _HASH[hash_name]
    oaep = padding.OAEP(padding.MGF1(h()), h(), None)
    if not aes_wrap:
        return public_key.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public_key.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)


def test_paths_on_softhsm(caps: TokenCapabilities) -> None:
    assert key_import.is_software_token(caps)
    assert key_import.import_path(caps, "RSAES_OAEP_SHA_1")[0] == IN_TOKEN
    assert key_import.import_path(caps, "RSA_AES_KEY_WRAP_SHA_1")[0] == IN_TOKEN
    # SoftHSM2 2.6.1: OAEP-SHA256 only through the raw operation (FACTS.md §0.2).
    for algorithm in ("RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_256"):
        assert key_import.import_path(caps, algorithm)[0] in (IN_TOKEN,
                                                                RAW_IN_TOKEN_HOST_DECODING)
    assert key_import.import_path(caps, "RSAES_PKCS1_V1_5")[0] == UNSUPPORTED
    rows = key_import.wrapping_rows(caps)
    assert {r[1] for r in rows} >= set(key_import.WRAPPING_ALGORITHMS)


def test_hardware_token_refuses_host_decoding(caps: TokenCapabilities) -> None:
    hardware = dataclasses.replace(caps, token_manufacturer="Acme HSM Inc.",
                                   token_model="Model 9")
    hardware = hardware.with_path("RSAES_OAEP_SHA_256", RAW_IN_TOKEN_HOST_DECODING)
    path, detail = key_import.import_path(hardware, "RSAES_OAEP_SHA_256")
    assert path == UNSUPPORTED and "Acme HSM Inc." in detail
    assert key_import.import_path(hardware, "RSAES_OAEP_SHA_256",
                                  allow_host_decoding=True)[0] == RAW_IN_TOKEN_HOST_DECODING


@pytest.mark.parametrize("algorithm", list(key_import.WRAPPING_ALGORITHMS))
def test_import_each_algorithm(hsm_partition: HsmPartition, caps: TokenCapabilities,
                               wrapping_key: GeneratedKey, algorithm: str) -> None:
    material = os.urandom(32)
    assert wrapping_key.public_key_der is not None
    path, _ = key_import.import_path(caps, algorithm)
    first = key_import.import_material(
        hsm_partition, path, algorithm, wrapping_key.wrapped_private, "RSA_2048",
        wrap(wrapping_key.public_key_der, algorithm, material))
    again = key_import.import_material(
        hsm_partition, path, algorithm, wrapping_key.wrapped_private, "RSA_2048",
        wrap(wrapping_key.public_key_der, algorithm, material))
    other = key_import.import_material(
        hsm_partition, path, algorithm, wrapping_key.wrapped_private, "RSA_2048",
        wrap(wrapping_key.public_key_der, algorithm, os.urandom(32)))
    assert first.check_value == again.check_value != other.check_value
    assert material not in first.wrapped
    # The re-wrapped key is a working backing key: encrypt with it in the token and
    # check the result with the material we imported.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    nonce = os.urandom(12)
    sealed = hsm_partition.encrypt_gcm(first.wrapped, nonce, b"aad", b"hello")
    assert AESGCM(material).decrypt(nonce, sealed, b"aad") == b"hello"


def test_garbage_is_one_error(hsm_partition: HsmPartition, caps: TokenCapabilities,
                              wrapping_key: GeneratedKey) -> None:
    for algorithm in key_import.WRAPPING_ALGORITHMS:
        path, _ = key_import.import_path(caps, algorithm)
        for blob in (os.urandom(256), os.urandom(10), os.urandom(256 + 40)):
            with pytest.raises(HsmAuthenticationFailed):
                key_import.import_material(hsm_partition, path, algorithm,
                                           wrapping_key.wrapped_private, "RSA_2048", blob)


def test_short_material_refused(hsm_partition: HsmPartition, caps: TokenCapabilities,
                                wrapping_key: GeneratedKey) -> None:
    assert wrapping_key.public_key_der is not None
    blob = wrap(wrapping_key.public_key_der, "RSAES_OAEP_SHA_1", os.urandom(16))
    with pytest.raises(key_import.InvalidMaterial):
        key_import.import_material(hsm_partition, IN_TOKEN, "RSAES_OAEP_SHA_1",
                                   wrapping_key.wrapped_private, "RSA_2048", blob)
