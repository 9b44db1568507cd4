"""kmsd.hsm.asymmetric, .oaep and .capabilities against a real SoftHSM2 token.

Every signature is checked with `cryptography` and the public key the token
returned; every decryption starts from a ciphertext `cryptography` made; ECDH
is compared with `cryptography`'s ECDH from the peer's side; HMAC with Python's
`hmac`. The SoftHSM2 token comes from tests/unit/hsm/conftest.py.
RSA_4096 is generated once, in one test (it takes seconds).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from kmsd.hsm import asymmetric, capabilities, oaep
from kmsd.hsm.asymmetric import (
    DIGEST,
    DIGEST_LENGTHS,
    RAW,
    AsymmetricKeys,
    GeneratedKey,
    InvalidInput,
    UnsupportedByToken,
)
from kmsd.hsm.capabilities import (
    HOST_HASH_IN_TOKEN_SIGN,
    IN_TOKEN,
    RAW_IN_TOKEN_HOST_DECODING,
    UNSUPPORTED,
    TokenCapabilities,
)
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError, HsmPartition

MESSAGE = b"The quick brown fox jumps over the lazy dog" * 3
HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512}
CURVES = {"ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1,
          "ECC_NIST_P521": ec.SECP521R1, "ECC_SECG_P256K1": ec.SECP256K1}
RSA_ALGORITHMS = capabilities.RSASSA_PSS + capabilities.RSASSA_PKCS1


# -- fixtures ------------------------------------------------------------------

@pytest.fixture(scope="module")
def caps(hsm_partition: HsmPartition) -> TokenCapabilities:
    return capabilities.probe(hsm_partition)


@pytest.fixture(scope="module")
def keys(hsm_partition: HsmPartition, caps: TokenCapabilities) -> Iterator[AsymmetricKeys]:
    ops = AsymmetricKeys(hsm_partition, caps)
    yield ops
    ops.close()


@pytest.fixture(scope="module")
def key_for(keys: AsymmetricKeys) -> Callable[[str], GeneratedKey]:
    """One generated key per key spec for the whole module (RSA keygen is slow)."""
    made: dict[str, GeneratedKey] = {}

    def get(key_spec: str) -> GeneratedKey:
        if key_spec not in made:
            made[key_spec] = keys.generate(key_spec)
        return made[key_spec]
    return get


def _public(generated: GeneratedKey) -> Any:
    assert generated.public_key_der is not None
    return load_der_public_key(generated.public_key_der)


def _digest(algorithm: str, message: bytes) -> bytes:
    return hashlib.new(capabilities.ALGORITHM_HASH[algorithm], message).digest()


def _verify_independently(public_key: Any, algorithm: str, message: bytes, message_type: str,
                          signature: bytes) -> None:
    """Raises InvalidSignature unless `signature` is right; uses only `cryptography`."""
    h = HASHES[capabilities.ALGORITHM_HASH[algorithm]]()
    chosen: Any = Prehashed(h) if message_type == DIGEST else h
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, message, ec.ECDSA(chosen))
    elif algorithm in capabilities.RSASSA_PSS:
        public_key.verify(signature, message,
                          padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), chosen)
    else:
        public_key.verify(signature, message, padding.PKCS1v15(), chosen)


def _import_hmac_key(partition: HsmPartition, value: bytes) -> bytes:
    """Test only: put a known HMAC key into the token and wrap it as kmsd would."""
    known = partition.session.create_object({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.TOKEN: False, Attribute.VALUE: value, Attribute.SIGN: True,
        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True})
    try:
        return bytes(partition.domain_key.wrap_key(known, mechanism=Mechanism.AES_KEY_WRAP_PAD))
    finally:
        known.destroy()


def _is_softhsm_2_6(caps: TokenCapabilities) -> bool:
    return caps.token_model.startswith("SoftHSM") and caps.token_firmware == "2.6"


# -- capabilities ----------------------------------------------------------------

def test_probe_lists_every_key_spec_and_algorithm_with_a_path(caps: TokenCapabilities) -> None:
    names = [row[1] for row in caps.rows()]
    expected = (set(capabilities.KEY_SPECS) | set(capabilities.ALL_SIGNING_ALGORITHMS)
                | set(capabilities.ALL_ENCRYPTION_ALGORITHMS)
                | set(capabilities.HMAC_ALGORITHMS) | {capabilities.ECDH})
    assert sorted(names) == sorted(expected)  # each exactly once
    for kind, _name, path, detail in caps.rows():
        assert kind in (capabilities.KIND_KEY_SPEC, capabilities.KIND_SIGNING,
                        capabilities.KIND_ENCRYPTION, capabilities.KIND_MAC,
                        capabilities.KIND_KEY_AGREEMENT)
        assert path in capabilities.PATHS
        assert detail
    assert caps.token_label and caps.mechanisms
    assert caps.probe_seconds < 5


def test_probe_leaves_no_objects_behind(hsm_partition: HsmPartition) -> None:
    before = len(list(hsm_partition.session.get_objects()))
    capabilities.probe(hsm_partition)
    assert len(list(hsm_partition.session.get_objects())) == before


def test_softhsm_2_6_capability_table(caps: TokenCapabilities) -> None:
    if not _is_softhsm_2_6(caps):
        pytest.skip(f"measured table is for SoftHSM2 2.6, this is {caps.token_model} "
                    f"{caps.token_firmware}")
    expected = {
        **dict.fromkeys(capabilities.RSA_KEY_SPECS, IN_TOKEN),
        **dict.fromkeys(capabilities.EC_KEY_SPECS, IN_TOKEN),
        **dict.fromkeys(capabilities.HMAC_KEY_SPECS, IN_TOKEN),
        **dict.fromkeys(RSA_ALGORITHMS, IN_TOKEN),
        **dict.fromkeys(capabilities.ECDSA, HOST_HASH_IN_TOKEN_SIGN),
        **dict.fromkeys(capabilities.HMAC_ALGORITHMS, IN_TOKEN),
        "RSAES_OAEP_SHA_1": IN_TOKEN,
        "RSAES_OAEP_SHA_256": RAW_IN_TOKEN_HOST_DECODING,
        "ECDH": IN_TOKEN,
        # Generates and signs, but cannot wrap an EC_EDWARDS private key (KeyNotWrappable).
        "ECC_NIST_EDWARDS25519": UNSUPPORTED, "ED25519_SHA_512": UNSUPPORTED,
        # Ignores the CKM_EDDSA phFlag.
        "ED25519_PH_SHA_512": UNSUPPORTED,
        **dict.fromkeys(capabilities.ML_DSA_KEY_SPECS + capabilities.ML_KEM_KEY_SPECS
                        + ("ML_DSA_SHAKE_256", "SM2", "SM2DSA", "SM2PKE"), UNSUPPORTED),
    }
    assert {row[1]: row[2] for row in caps.rows()} == expected
    assert "KeyNotWrappable" in caps.entry("ECC_NIST_EDWARDS25519").detail
    assert "phFlag" in caps.entry("ED25519_PH_SHA_512").detail
    assert "ArgumentsBad" in caps.entry("RSAES_OAEP_SHA_256").detail


def test_with_path_overrides_one_entry(caps: TokenCapabilities) -> None:
    forced = caps.with_path("RSAES_OAEP_SHA_1", RAW_IN_TOKEN_HOST_DECODING, "test")
    assert forced.path("RSAES_OAEP_SHA_1") == RAW_IN_TOKEN_HOST_DECODING
    assert forced.entry("RSAES_OAEP_SHA_1").detail == "test"
    assert forced.path("RSAES_OAEP_SHA_256") == caps.path("RSAES_OAEP_SHA_256")
    with pytest.raises(ValueError):
        caps.with_path("RSAES_OAEP_SHA_1", "somewhere")


# -- key generation ------------------------------------------------------------

@pytest.mark.parametrize("key_spec", ["RSA_2048", "RSA_3072"])
def test_generate_rsa_returns_spki(key_for: Callable[[str], GeneratedKey], key_spec: str) -> None:
    generated = key_for(key_spec)
    public_key = _public(generated)
    assert isinstance(public_key, rsa.RSAPublicKey)
    assert public_key.key_size == capabilities.RSA_KEY_SPECS[key_spec]
    assert public_key.public_numbers().e == 65537
    # SubjectPublicKeyInfo, not PKCS#1: re-encoding as SPKI gives the same bytes.
    assert generated.public_key_der == public_key.public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert generated.key_spec == key_spec


@pytest.mark.parametrize("key_spec", list(CURVES))
def test_generate_ec_returns_spki(key_for: Callable[[str], GeneratedKey], key_spec: str) -> None:
    generated = key_for(key_spec)
    public_key = _public(generated)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == capabilities.EC_KEY_SPECS[key_spec]
    assert generated.public_key_der == public_key.public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("key_spec", list(capabilities.HMAC_KEY_SPECS))
def test_generate_hmac_has_no_public_key(key_for: Callable[[str], GeneratedKey],
                                         key_spec: str) -> None:
    generated = key_for(key_spec)
    assert generated.public_key_der is None
    # RFC 5649: 8-byte integrity block + key rounded up to 8 bytes.
    bits = capabilities.HMAC_KEY_SPECS[key_spec]
    assert len(generated.wrapped_private) == 8 + -(-bits // 64) * 8


def test_generate_ed25519_follows_the_probe(keys: AsymmetricKeys, caps: TokenCapabilities,
                                            hsm_partition: HsmPartition) -> None:
    if caps.supports("ECC_NIST_EDWARDS25519"):
        generated = keys.generate("ECC_NIST_EDWARDS25519")
        assert isinstance(_public(generated), ed25519.Ed25519PublicKey)
        signature = keys.sign(generated.wrapped_private, "ECC_NIST_EDWARDS25519",
                              "ED25519_SHA_512", MESSAGE, RAW)
        _public(generated).verify(signature, MESSAGE)
        return
    with pytest.raises(UnsupportedByToken) as raised:
        keys.generate("ECC_NIST_EDWARDS25519")
    assert hsm_partition.token_label in str(raised.value)
    assert "ECC_NIST_EDWARDS25519" in str(raised.value)


@pytest.mark.parametrize("key_spec", ["SM2", "ML_DSA_65", "ML_KEM_768"])
def test_generate_unimplemented_key_specs_is_unsupported(keys: AsymmetricKeys,
                                                         key_spec: str) -> None:
    with pytest.raises(UnsupportedByToken, match=key_spec):
        keys.generate(key_spec)


def test_generate_unknown_key_spec_is_invalid(keys: AsymmetricKeys) -> None:
    with pytest.raises(InvalidInput):
        keys.generate("RSA_1024")


def test_rsa_4096_generate_sign_decrypt(keys: AsymmetricKeys) -> None:
    """The one RSA-4096 key of the module (keygen takes seconds)."""
    generated = keys.generate("RSA_4096")
    public_key = _public(generated)
    assert public_key.key_size == 4096
    signature = keys.sign(generated.wrapped_private, "RSA_4096", "RSASSA_PSS_SHA_512",
                          MESSAGE, RAW)
    _verify_independently(public_key, "RSASSA_PSS_SHA_512", MESSAGE, RAW, signature)
    for algorithm, h in (("RSAES_OAEP_SHA_1", hashes.SHA1), ("RSAES_OAEP_SHA_256", hashes.SHA256)):
        limit = asymmetric.max_plaintext_length("RSA_4096", algorithm)
        plaintext = os.urandom(limit)
        ciphertext = public_key.encrypt(plaintext, padding.OAEP(padding.MGF1(h()), h(), None))
        assert keys.decrypt(generated.wrapped_private, "RSA_4096", algorithm,
                            ciphertext) == plaintext


# -- Sign / Verify ---------------------------------------------------------------

@pytest.mark.parametrize("message_type", [RAW, DIGEST])
@pytest.mark.parametrize("algorithm", RSA_ALGORITHMS)
def test_rsa_sign_verifies_with_cryptography(keys: AsymmetricKeys,
                                             key_for: Callable[[str], GeneratedKey],
                                             algorithm: str, message_type: str) -> None:
    generated = key_for("RSA_2048")
    message = MESSAGE if message_type == RAW else _digest(algorithm, MESSAGE)
    signature = keys.sign(generated.wrapped_private, "RSA_2048", algorithm, message,
                          message_type)
    assert len(signature) == 256
    _verify_independently(_public(generated), algorithm, message, message_type, signature)
    assert asymmetric.verify(generated.public_key_der, algorithm, message, message_type,
                             signature)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert not asymmetric.verify(generated.public_key_der, algorithm, message, message_type,
                                 tampered)
    assert not asymmetric.verify(generated.public_key_der, algorithm,
                                 message[:-1] + bytes([message[-1] ^ 1]), message_type,
                                 signature)


@pytest.mark.parametrize("algorithm", capabilities.RSASSA_PKCS1)
def test_rsa_pkcs1_raw_and_digest_give_the_same_signature(
        keys: AsymmetricKeys, key_for: Callable[[str], GeneratedKey], algorithm: str) -> None:
    """PKCS#1 v1.5 is deterministic, so this checks the DigestInfo prefixes byte for byte."""
    wrapped = key_for("RSA_2048").wrapped_private
    assert keys.sign(wrapped, "RSA_2048", algorithm, MESSAGE, RAW) == keys.sign(
        wrapped, "RSA_2048", algorithm, _digest(algorithm, MESSAGE), DIGEST)


def test_rsa_3072_sign(keys: AsymmetricKeys, key_for: Callable[[str], GeneratedKey]) -> None:
    generated = key_for("RSA_3072")
    signature = keys.sign(generated.wrapped_private, "RSA_3072", "RSASSA_PSS_SHA_384",
                          _digest("RSASSA_PSS_SHA_384", MESSAGE), DIGEST)
    _verify_independently(_public(generated), "RSASSA_PSS_SHA_384",
                          _digest("RSASSA_PSS_SHA_384", MESSAGE), DIGEST, signature)


@pytest.mark.parametrize("message_type", [RAW, DIGEST])
@pytest.mark.parametrize("key_spec", list(CURVES))
def test_ecdsa_sign_verifies_with_cryptography(keys: AsymmetricKeys,
                                               key_for: Callable[[str], GeneratedKey],
                                               key_spec: str, message_type: str) -> None:
    generated = key_for(key_spec)
    (algorithm,) = capabilities.SIGNING_ALGORITHMS[key_spec]
    message = MESSAGE if message_type == RAW else _digest(algorithm, MESSAGE)
    signature = keys.sign(generated.wrapped_private, key_spec, algorithm, message, message_type)
    assert signature[0] == 0x30  # DER ECDSA-Sig-Value, as KMS returns
    _verify_independently(_public(generated), algorithm, message, message_type, signature)
    assert asymmetric.verify(generated.public_key_der, algorithm, message, message_type,
                             signature)
    assert not asymmetric.verify(generated.public_key_der, algorithm, message, message_type,
                                 signature[:-1] + bytes([signature[-1] ^ 1]))


def test_verify_returns_false_for_garbage_signatures(
        keys: AsymmetricKeys, key_for: Callable[[str], GeneratedKey]) -> None:
    for key_spec, algorithm in (("RSA_2048", "RSASSA_PSS_SHA_256"),
                                ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_256"),
                                ("ECC_NIST_P256", "ECDSA_SHA_256")):
        der = key_for(key_spec).public_key_der
        assert der is not None
        for signature in (b"", b"\x00", os.urandom(64), os.urandom(256), b"\x30\x02\x02\x00"):
            assert asymmetric.verify(der, algorithm, MESSAGE, RAW, signature) is False


@pytest.mark.parametrize(("key_spec", "algorithm"), [
    ("RSA_2048", "RSASSA_PSS_SHA_256"), ("RSA_2048", "RSASSA_PKCS1_V1_5_SHA_512"),
    ("ECC_NIST_P256", "ECDSA_SHA_256"), ("ECC_NIST_P521", "ECDSA_SHA_512")])
def test_digest_of_the_wrong_length_is_invalid_input(keys: AsymmetricKeys,
                                                     key_for: Callable[[str], GeneratedKey],
                                                     key_spec: str, algorithm: str) -> None:
    generated = key_for(key_spec)
    wrong = hashlib.sha1(MESSAGE).digest()
    with pytest.raises(InvalidInput, match=f"{DIGEST_LENGTHS[algorithm]}-byte digest"):
        keys.sign(generated.wrapped_private, key_spec, algorithm, wrong, DIGEST)
    with pytest.raises(InvalidInput):
        asymmetric.verify(generated.public_key_der, algorithm, wrong, DIGEST, b"\x00" * 64)


def test_digest_lengths_are_exposed() -> None:
    assert DIGEST_LENGTHS["RSASSA_PSS_SHA_256"] == 32
    assert DIGEST_LENGTHS["RSASSA_PKCS1_V1_5_SHA_384"] == 48
    assert DIGEST_LENGTHS["ECDSA_SHA_512"] == 64
    assert DIGEST_LENGTHS["ED25519_PH_SHA_512"] == 64
    assert "ED25519_SHA_512" not in DIGEST_LENGTHS  # RAW only


@pytest.mark.parametrize(("key_spec", "algorithm"), [
    ("ECC_NIST_P256", "ECDSA_SHA_384"), ("ECC_NIST_P384", "ECDSA_SHA_256"),
    ("ECC_SECG_P256K1", "ECDSA_SHA_512"), ("ECC_NIST_P256", "RSASSA_PSS_SHA_256"),
    ("RSA_2048", "ECDSA_SHA_256"), ("HMAC_256", "RSASSA_PSS_SHA_256")])
def test_algorithm_not_valid_for_key_spec(keys: AsymmetricKeys,
                                          key_for: Callable[[str], GeneratedKey],
                                          key_spec: str, algorithm: str) -> None:
    with pytest.raises(InvalidInput, match="not valid for key spec"):
        keys.sign(key_for(key_spec).wrapped_private, key_spec, algorithm,
                  _digest(algorithm, MESSAGE), DIGEST)


def test_wrapped_key_used_with_another_key_spec(keys: AsymmetricKeys,
                                                key_for: Callable[[str], GeneratedKey]) -> None:
    # Uncached: the unwrapped object is checked against the key spec, then destroyed.
    with pytest.raises(InvalidInput, match="not a RSA_3072 key"):
        keys.sign(key_for("RSA_2048").wrapped_private, "RSA_3072", "RSASSA_PSS_SHA_256",
                  MESSAGE, RAW)
    with pytest.raises(InvalidInput, match="not a ECC_NIST_P384 key"):
        keys.sign(key_for("ECC_NIST_P256").wrapped_private, "ECC_NIST_P384", "ECDSA_SHA_384",
                  MESSAGE, RAW)
    # Cached under its real spec: still refused.
    keys.sign(key_for("ECC_NIST_P256").wrapped_private, "ECC_NIST_P256", "ECDSA_SHA_256",
              MESSAGE, RAW)
    with pytest.raises(InvalidInput):
        keys.sign(key_for("ECC_NIST_P256").wrapped_private, "ECC_SECG_P256K1",
                  "ECDSA_SHA_256", MESSAGE, RAW)
    # An RSA blob does not unwrap as an EC private key at all.
    with pytest.raises((HsmError, InvalidInput)):
        keys.sign(key_for("RSA_3072").wrapped_private, "ECC_NIST_P521", "ECDSA_SHA_512",
                  MESSAGE, RAW)


def test_ed25519_host_verify_and_message_types() -> None:
    private = ed25519.Ed25519PrivateKey.generate()
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    signature = private.sign(MESSAGE)
    assert asymmetric.verify(der, "ED25519_SHA_512", MESSAGE, RAW, signature)
    assert not asymmetric.verify(der, "ED25519_SHA_512", MESSAGE + b"!", RAW, signature)
    with pytest.raises(InvalidInput, match="RAW"):
        asymmetric.verify(der, "ED25519_SHA_512", hashlib.sha512(MESSAGE).digest(), DIGEST,
                          signature)
    with pytest.raises(UnsupportedByToken, match="ED25519_PH_SHA_512"):
        asymmetric.verify(der, "ED25519_PH_SHA_512", MESSAGE, RAW, signature)


def test_ed25519_spki_and_eddsa_in_token(hsm_partition: HsmPartition) -> None:
    """The Ed25519 pieces kmsd uses once a token can wrap EC_EDWARDS keys (SoftHSM2 2.6.1
    cannot), exercised on an ephemeral, never-wrapped session key pair."""
    if Mechanism.EC_EDWARDS_KEY_PAIR_GEN not in hsm_partition.token.slot.get_mechanisms():
        pytest.skip("token has no Ed25519")
    params = hsm_partition.session.create_domain_parameters(
        KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: capabilities.ED25519_EC_PARAMS}, local=True)
    public, private = params.generate_keypair(store=False,
                                              mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN)
    try:
        spki = asymmetric.ed25519_spki(bytes(public[Attribute.EC_POINT]))
        public_key = load_der_public_key(spki)
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
        assert public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == spki
        signature = asymmetric._sign_eddsa(private, MESSAGE)
        assert len(signature) == 64
        public_key.verify(signature, MESSAGE)
        assert asymmetric.verify(spki, "ED25519_SHA_512", MESSAGE, RAW, signature)
    finally:
        private.destroy()
        public.destroy()


def test_ed25519_ph_sign_is_unsupported(keys: AsymmetricKeys,
                                        hsm_partition: HsmPartition) -> None:
    with pytest.raises(UnsupportedByToken) as raised:
        keys.sign(b"\x00" * 40, "ECC_NIST_EDWARDS25519", "ED25519_PH_SHA_512",
                  hashlib.sha512(MESSAGE).digest(), DIGEST)
    assert hsm_partition.token_label in str(raised.value)


def test_verify_rejects_unreadable_public_keys() -> None:
    with pytest.raises(InvalidInput):
        asymmetric.verify(b"not a key", "ECDSA_SHA_256", MESSAGE, RAW, b"")
    small = rsa.generate_private_key(65537, 1024).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InvalidInput, match="no KMS key spec"):
        asymmetric.verify(small, "RSASSA_PSS_SHA_256", MESSAGE, RAW, b"")


# -- Decrypt / Encrypt -------------------------------------------------------------

OAEP_HASHES = {"RSAES_OAEP_SHA_1": hashes.SHA1, "RSAES_OAEP_SHA_256": hashes.SHA256}


def _oaep_encrypt(public_key: Any, algorithm: str, plaintext: bytes,
                  label: bytes | None = None) -> bytes:
    h = OAEP_HASHES[algorithm]
    return bytes(public_key.encrypt(plaintext, padding.OAEP(padding.MGF1(h()), h(), label)))


@pytest.mark.parametrize("algorithm", list(OAEP_HASHES))
@pytest.mark.parametrize("key_spec", ["RSA_2048", "RSA_3072"])
def test_decrypt_what_cryptography_encrypted(keys: AsymmetricKeys,
                                             key_for: Callable[[str], GeneratedKey],
                                             key_spec: str, algorithm: str) -> None:
    generated = key_for(key_spec)
    limit = asymmetric.max_plaintext_length(key_spec, algorithm)
    for plaintext in (b"", b"\x00", b"\x01\x00", os.urandom(32), os.urandom(limit)):
        ciphertext = _oaep_encrypt(_public(generated), algorithm, plaintext)
        assert keys.decrypt(generated.wrapped_private, key_spec, algorithm,
                            ciphertext) == plaintext


def test_decrypt_sha1_through_the_host_decoding_path_too(
        hsm_partition: HsmPartition, caps: TokenCapabilities,
        key_for: Callable[[str], GeneratedKey]) -> None:
    forced = AsymmetricKeys(hsm_partition, caps.with_path(
        "RSAES_OAEP_SHA_1", RAW_IN_TOKEN_HOST_DECODING, "test"))
    try:
        generated = key_for("RSA_2048")
        ciphertext = _oaep_encrypt(_public(generated), "RSAES_OAEP_SHA_1", b"forced path")
        assert forced.decrypt(generated.wrapped_private, "RSA_2048", "RSAES_OAEP_SHA_1",
                              ciphertext) == b"forced path"
        with pytest.raises(HsmAuthenticationFailed):
            forced.decrypt(generated.wrapped_private, "RSA_2048", "RSAES_OAEP_SHA_1",
                           _oaep_encrypt(_public(generated), "RSAES_OAEP_SHA_1", b"x", b"L"))
    finally:
        forced.close()


@pytest.mark.parametrize("algorithm", list(OAEP_HASHES))
def test_every_decryption_failure_is_one_uniform_error(
        keys: AsymmetricKeys, key_for: Callable[[str], GeneratedKey], algorithm: str) -> None:
    generated = key_for("RSA_2048")
    other = key_for("RSA_3072")
    public_key = _public(generated)
    good = _oaep_encrypt(public_key, algorithm, b"attack at dawn")
    other_hash = "RSAES_OAEP_SHA_256" if algorithm == "RSAES_OAEP_SHA_1" else "RSAES_OAEP_SHA_1"
    other_2048 = rsa.generate_private_key(65537, 2048).public_key()
    bad = {
        "wrong label": _oaep_encrypt(public_key, algorithm, b"attack at dawn", b"label"),
        "tampered first byte": bytes([good[0] ^ 0x80]) + good[1:],
        "tampered last byte": good[:-1] + bytes([good[-1] ^ 1]),
        "other hash": _oaep_encrypt(public_key, other_hash, b"attack at dawn"),
        "other key": _oaep_encrypt(other_2048, algorithm, b"attack at dawn"),
        "too short": good[:-1],
        "too long": good + b"\x00",
        "not below the modulus": b"\xff" * 256,
        "zero": b"\x00" * 256,
        "encrypted for RSA_3072": _oaep_encrypt(_public(other), algorithm, b"x"),
    }
    errors = []
    for _cause, ciphertext in bad.items():
        with pytest.raises(HsmAuthenticationFailed) as raised:
            keys.decrypt(generated.wrapped_private, "RSA_2048", algorithm, ciphertext)
        errors.append((type(raised.value), raised.value.args, str(raised.value)))
    assert set(errors) == {(HsmAuthenticationFailed, (), "")}
    # And the key still works afterwards.
    assert keys.decrypt(generated.wrapped_private, "RSA_2048", algorithm,
                        good) == b"attack at dawn"


def test_host_encrypt_helper_round_trips(keys: AsymmetricKeys,
                                         key_for: Callable[[str], GeneratedKey]) -> None:
    generated = key_for("RSA_2048")
    assert generated.public_key_der is not None
    for algorithm in OAEP_HASHES:
        ciphertext = asymmetric.encrypt(generated.public_key_der, algorithm, b"to the token")
        assert len(ciphertext) == 256
        assert keys.decrypt(generated.wrapped_private, "RSA_2048", algorithm,
                            ciphertext) == b"to the token"
        limit = asymmetric.max_plaintext_length("RSA_2048", algorithm)
        with pytest.raises(InvalidInput, match=f"at most {limit} bytes"):
            asymmetric.encrypt(generated.public_key_der, algorithm, b"x" * (limit + 1))
    ec_der = key_for("ECC_NIST_P256").public_key_der
    assert ec_der is not None
    with pytest.raises(InvalidInput):
        asymmetric.encrypt(ec_der, "RSAES_OAEP_SHA_256", b"x")


def test_max_plaintext_lengths_match_kms() -> None:
    # AWS KMS Encrypt: RSA_2048 214/190, RSA_3072 342/318, RSA_4096 470/446 bytes.
    expected = {("RSA_2048", "RSAES_OAEP_SHA_1"): 214, ("RSA_2048", "RSAES_OAEP_SHA_256"): 190,
                ("RSA_3072", "RSAES_OAEP_SHA_1"): 342, ("RSA_3072", "RSAES_OAEP_SHA_256"): 318,
                ("RSA_4096", "RSAES_OAEP_SHA_1"): 470, ("RSA_4096", "RSAES_OAEP_SHA_256"): 446}
    for (key_spec, algorithm), length in expected.items():
        assert asymmetric.max_plaintext_length(key_spec, algorithm) == length


def test_decrypt_with_a_non_rsa_key_spec_is_invalid(
        keys: AsymmetricKeys, key_for: Callable[[str], GeneratedKey]) -> None:
    with pytest.raises(InvalidInput):
        keys.decrypt(key_for("ECC_NIST_P256").wrapped_private, "ECC_NIST_P256",
                     "RSAES_OAEP_SHA_256", b"\x00" * 64)


# -- oaep.decode on the host, against cryptography's RSA -----------------------------

def _mask(db: bytes, seed: bytes, hash_name: str, leading: int = 0) -> bytes:
    """EM = Y || maskedSeed || maskedDB for an arbitrary (possibly malformed) DB."""
    masked_db = bytes(a ^ b for a, b in zip(db, oaep.mgf1(seed, len(db), hash_name),
                                            strict=True))
    seed_mask = oaep.mgf1(masked_db, len(seed), hash_name)
    return bytes([leading]) + bytes(a ^ b for a, b in zip(seed, seed_mask, strict=True)) \
        + masked_db


@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_oaep_decode_matches_cryptography(hash_name: str) -> None:
    private = rsa.generate_private_key(65537, 2048)
    numbers = private.private_numbers()
    n, d = numbers.public_numbers.n, numbers.d
    h = HASHES[hash_name]
    for label in (None, b"a label"):
        ciphertext = private.public_key().encrypt(
            b"message", padding.OAEP(padding.MGF1(h()), h(), label))
        em = pow(int.from_bytes(ciphertext, "big"), d, n).to_bytes(256, "big")
        assert oaep.decode(em, hash_name, label or b"") == b"message"


@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
def test_oaep_decode_fails_the_same_way_for_every_check(hash_name: str) -> None:
    h_len = hashlib.new(hash_name).digest_size
    k = 256
    l_hash = hashlib.new(hash_name, b"").digest()
    seed = os.urandom(h_len)
    ps_len = k - 2 * h_len - 2 - 5
    good_db = l_hash + b"\x00" * ps_len + b"\x01" + b"hello"
    assert oaep.decode(_mask(good_db, seed, hash_name), hash_name) == b"hello"
    empty_message_db = l_hash + b"\x00" * (ps_len + 5) + b"\x01"
    assert oaep.decode(_mask(empty_message_db, seed, hash_name), hash_name) == b""
    # Message bytes 0x00 / 0x01 after the separator belong to the message.
    tricky_db = l_hash + b"\x00" * ps_len + b"\x01" + b"\x01\x00\x01\x02\x00"
    assert oaep.decode(_mask(tricky_db, seed, hash_name), hash_name) == b"\x01\x00\x01\x02\x00"

    bad_ems = {
        "Y is not zero": _mask(good_db, seed, hash_name, leading=1),
        "Y is 0x80": _mask(good_db, seed, hash_name, leading=0x80),
        "wrong label hash": _mask(bytes([good_db[0] ^ 1]) + good_db[1:], seed, hash_name),
        "no separator": _mask(l_hash + b"\x00" * (k - 2 * h_len - 1), seed, hash_name),
        "non-zero padding byte": _mask(l_hash + b"\x00" * (ps_len - 1) + b"\x02\x01hello",
                                       seed, hash_name),
        "0xff before the separator": _mask(l_hash + b"\xff" + b"\x00" * (ps_len - 1)
                                           + b"\x01hello", seed, hash_name),
        "too short for the hash": b"\x00" * (2 * h_len + 1),
    }
    outcomes = set()
    for _cause, em in bad_ems.items():
        with pytest.raises(HsmAuthenticationFailed) as raised:
            oaep.decode(em, hash_name)
        outcomes.add((type(raised.value), raised.value.args))
    assert outcomes == {(HsmAuthenticationFailed, ())}
    with pytest.raises(HsmAuthenticationFailed):
        oaep.decode(_mask(good_db, seed, hash_name), hash_name, label=b"other")


def test_mgf1_known_answer() -> None:
    # MGF1-SHA1("foo", 3) and ("bar", 5): widely quoted test values.
    assert oaep.mgf1(b"foo", 3, "sha1").hex() == "1ac907"
    assert oaep.mgf1(b"bar", 5, "sha1").hex() == "bc0c655e01"
    assert oaep.mgf1(b"bar", 50, "sha256")[:4].hex() == "382576a7"


# -- DeriveSharedSecret --------------------------------------------------------------

@pytest.mark.parametrize("key_spec", list(capabilities.KEY_AGREEMENT_KEY_SPECS))
def test_ecdh_equals_cryptography_from_the_peer_side(keys: AsymmetricKeys,
                                                     key_for: Callable[[str], GeneratedKey],
                                                     key_spec: str) -> None:
    generated = key_for(key_spec)
    peer = ec.generate_private_key(CURVES[key_spec]())
    peer_der = peer.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    shared = keys.derive_shared_secret(generated.wrapped_private, key_spec, peer_der)
    assert shared == peer.exchange(ec.ECDH(), _public(generated))
    assert len(shared) == (CURVES[key_spec]().key_size + 7) // 8


def test_ecdh_rejects_peers_on_another_curve_or_of_another_type(
        keys: AsymmetricKeys, key_for: Callable[[str], GeneratedKey]) -> None:
    wrapped = key_for("ECC_NIST_P256").wrapped_private
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(InvalidInput, match="secp384r1.*needs a secp256r1"):
        keys.derive_shared_secret(wrapped, "ECC_NIST_P256", p384)
    rsa_der = key_for("RSA_2048").public_key_der
    assert rsa_der is not None
    with pytest.raises(InvalidInput, match="not an EC key"):
        keys.derive_shared_secret(wrapped, "ECC_NIST_P256", rsa_der)
    with pytest.raises(InvalidInput):
        keys.derive_shared_secret(wrapped, "ECC_NIST_P256", b"\x30\x03\x02\x01\x00")
    # secp256k1 keys are SIGN_VERIFY only in KMS.
    k1 = key_for("ECC_SECG_P256K1")
    with pytest.raises(InvalidInput, match="not valid for key spec"):
        keys.derive_shared_secret(k1.wrapped_private, "ECC_SECG_P256K1", p384)


# -- GenerateMac / VerifyMac --------------------------------------------------------

@pytest.mark.parametrize(("key_spec", "algorithm"),
                         list(zip(capabilities.HMAC_KEY_SPECS, capabilities.HMAC_ALGORITHMS,
                                  strict=True)))
def test_hmac_equals_python_hmac(keys: AsymmetricKeys, hsm_partition: HsmPartition,
                                 key_spec: str, algorithm: str) -> None:
    value = os.urandom(capabilities.HMAC_KEY_SPECS[key_spec] // 8)
    wrapped = _import_hmac_key(hsm_partition, value)
    hash_name = capabilities.ALGORITHM_HASH[algorithm]
    for message in (b"", MESSAGE, os.urandom(4096)):
        expected = hmac.new(value, message, hash_name).digest()
        assert keys.generate_mac(wrapped, key_spec, algorithm, message) == expected
        assert keys.verify_mac(wrapped, key_spec, algorithm, message, expected)
        assert not keys.verify_mac(wrapped, key_spec, algorithm, message + b"x", expected)
        assert not keys.verify_mac(wrapped, key_spec, algorithm, message,
                                   expected[:-1] + bytes([expected[-1] ^ 1]))
        assert not keys.verify_mac(wrapped, key_spec, algorithm, message, expected[:-1])
        assert not keys.verify_mac(wrapped, key_spec, algorithm, message, b"")


def test_hmac_with_generated_keys(keys: AsymmetricKeys,
                                  key_for: Callable[[str], GeneratedKey]) -> None:
    for key_spec, algorithm in zip(capabilities.HMAC_KEY_SPECS, capabilities.HMAC_ALGORITHMS,
                                   strict=True):
        wrapped = key_for(key_spec).wrapped_private
        mac = keys.generate_mac(wrapped, key_spec, algorithm, MESSAGE)
        assert len(mac) == hashlib.new(capabilities.ALGORITHM_HASH[algorithm]).digest_size
        assert keys.verify_mac(wrapped, key_spec, algorithm, MESSAGE, mac)
    with pytest.raises(InvalidInput, match="not valid for key spec"):
        keys.generate_mac(key_for("HMAC_256").wrapped_private, "HMAC_256", "HMAC_SHA_512",
                          MESSAGE)


# -- the key material stays in the token --------------------------------------------

def test_wrapped_blobs_unwrap_only_under_their_domain_key(
        caps: TokenCapabilities, second_hsm_partition: HsmPartition,
        key_for: Callable[[str], GeneratedKey]) -> None:
    elsewhere = AsymmetricKeys(second_hsm_partition, caps)
    try:
        for key_spec, algorithm in (("RSA_2048", "RSASSA_PSS_SHA_256"),
                                    ("ECC_NIST_P256", "ECDSA_SHA_256")):
            with pytest.raises(HsmError, match="cannot unwrap"):
                elsewhere.sign(key_for(key_spec).wrapped_private, key_spec, algorithm,
                               MESSAGE, RAW)
        with pytest.raises(HsmError, match="cannot unwrap"):
            elsewhere.generate_mac(key_for("HMAC_256").wrapped_private, "HMAC_256",
                                   "HMAC_SHA_256", MESSAGE)
        assert elsewhere.cached_handles == 0
    finally:
        elsewhere.close()


def test_tampered_wrapped_blob_does_not_unwrap(keys: AsymmetricKeys,
                                               key_for: Callable[[str], GeneratedKey]) -> None:
    wrapped = key_for("ECC_NIST_P384").wrapped_private
    tampered = wrapped[:20] + bytes([wrapped[20] ^ 1]) + wrapped[21:]
    with pytest.raises(HsmError, match="cannot unwrap"):
        keys.sign(tampered, "ECC_NIST_P384", "ECDSA_SHA_384", MESSAGE, RAW)


def test_wrapped_blobs_do_not_carry_the_key_in_clear(
        key_for: Callable[[str], GeneratedKey]) -> None:
    # A PKCS#8 RSA/EC private key embeds the modulus / public point: a blob that held the
    # key in clear would contain them.
    rsa_key = key_for("RSA_2048")
    modulus = _public(rsa_key).public_numbers().n.to_bytes(256, "big")
    assert modulus[:32] not in rsa_key.wrapped_private
    ec_key = key_for("ECC_NIST_P256")
    point = _public(ec_key).public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    assert point[1:17] not in ec_key.wrapped_private


def test_the_token_refuses_to_reveal_unwrapped_keys(
        keys: AsymmetricKeys, hsm_partition: HsmPartition,
        key_for: Callable[[str], GeneratedKey]) -> None:
    for key_spec, secret_attributes in (
            ("RSA_2048", (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2)),
            ("ECC_NIST_P256", (Attribute.VALUE,)),
            ("HMAC_256", (Attribute.VALUE,))):
        handle = keys._handle(key_for(key_spec).wrapped_private, key_spec)
        assert handle[Attribute.SENSITIVE] is True
        assert handle[Attribute.EXTRACTABLE] is False
        assert handle[Attribute.TOKEN] is False  # a session object, gone with the session
        for attribute in secret_attributes:
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                handle[attribute]
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            hsm_partition.domain_key.wrap_key(handle, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def test_generate_leaves_no_session_objects(keys: AsymmetricKeys,
                                            hsm_partition: HsmPartition) -> None:
    before = len(list(hsm_partition.session.get_objects()))
    for key_spec in ("ECC_NIST_P256", "HMAC_384"):
        keys.generate(key_spec)
    assert len(list(hsm_partition.session.get_objects())) == before


# -- the handle cache -----------------------------------------------------------------

def test_handle_cache_is_bounded_and_destroys_what_it_evicts(
        hsm_partition: HsmPartition, caps: TokenCapabilities) -> None:
    small = AsymmetricKeys(hsm_partition, caps, handle_cache_size=2)
    try:
        generated = [small.generate("ECC_NIST_P256") for _ in range(3)]
        first = small._handle(generated[0].wrapped_private, "ECC_NIST_P256")
        assert first[Attribute.EXTRACTABLE] is False
        for g in generated:
            signature = small.sign(g.wrapped_private, "ECC_NIST_P256", "ECDSA_SHA_256",
                                   MESSAGE, RAW)
            _verify_independently(_public(g), "ECDSA_SHA_256", MESSAGE, RAW, signature)
        assert small.cached_handles == 2
        with pytest.raises(pkcs11.exceptions.PKCS11Error):  # destroyed on eviction
            first[Attribute.EXTRACTABLE]
        # Hits and misses; an evicted key simply unwraps again.
        hits = small.handle_cache_hits
        small.sign(generated[2].wrapped_private, "ECC_NIST_P256", "ECDSA_SHA_256", MESSAGE, RAW)
        assert small.handle_cache_hits == hits + 1
        small.sign(generated[0].wrapped_private, "ECC_NIST_P256", "ECDSA_SHA_256", MESSAGE, RAW)
        small.evict(generated[0].wrapped_private)
        assert small.cached_handles == 1
    finally:
        small.close()
    assert small.cached_handles == 0
