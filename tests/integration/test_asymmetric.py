"""Asymmetric, HMAC and key-agreement keys through boto3 against real 3-node clusters.

Everything kmsd produces is checked independently with `cryptography`: signatures with the
public key GetPublicKey returned (fetched from another node than the one that signed),
RSA ciphertexts made locally with OAEP (SHA-1 and SHA-256) are decrypted by kmsd, ECDH
secrets are compared with the one computed from the peer's side, data key pairs are checked
against their public keys and decrypted from PrivateKeyCiphertextBlob. Keys are created on
one node and used on the others. The AWS error for each misuse is checked with its message
form. RSA-4096 is generated once (the event-loop test).

Expected behaviour is taken from the AWS KMS API reference (Sign, Verify, GetPublicKey,
Encrypt, Decrypt, GenerateMac, VerifyMac, DeriveSharedSecret, GenerateDataKeyPair,
CreateKey), quoted where a test checks one of its sentences.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_private_key,
    load_der_public_key,
)

from tests.integration.harness import Cluster, error_of, stored_views, wait_for

MESSAGE = b"kmsd asymmetric integration test " * 4
HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
CURVES = {"ECC_NIST_P256": ec.SECP256R1(), "ECC_NIST_P384": ec.SECP384R1(),
          "ECC_NIST_P521": ec.SECP521R1(), "ECC_SECG_P256K1": ec.SECP256K1()}
RSA_SIGNING = ["RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384",
               "RSASSA_PKCS1_V1_5_SHA_512", "RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384",
               "RSASSA_PSS_SHA_512"]
ECDSA = {"ECC_NIST_P256": "ECDSA_SHA_256", "ECC_NIST_P384": "ECDSA_SHA_384",
         "ECC_NIST_P521": "ECDSA_SHA_512", "ECC_SECG_P256K1": "ECDSA_SHA_256"}
ALGORITHM_MEMBERS = ("EncryptionAlgorithms", "SigningAlgorithms", "MacAlgorithms",
                     "KeyAgreementAlgorithms")


def hash_of(algorithm: str) -> hashes.HashAlgorithm:
    return HASHES[algorithm[-3:]]()


def verify_locally(public_der: bytes, algorithm: str, message: bytes, message_type: str,
                   signature: bytes) -> None:
    """Raises InvalidSignature unless `signature` is right; never consults kmsd."""
    public_key = load_der_public_key(public_der)
    h = hash_of(algorithm)
    chosen: Any = Prehashed(h) if message_type == "DIGEST" else h
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(signature, message, ec.ECDSA(chosen))
    elif algorithm.startswith("RSASSA_PSS"):
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, message, padding.PSS(padding.MGF1(h), h.digest_size),
                          chosen)
    else:
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, message, padding.PKCS1v15(), chosen)


@pytest.fixture(scope="module")
def key(cluster: Cluster) -> Iterator[Callable[[str, str], dict[str, Any]]]:
    """One KMS key per (KeySpec, KeyUsage) for the module, created on rotating nodes."""
    made: dict[tuple[str, str], dict[str, Any]] = {}

    def get(key_spec: str, key_usage: str) -> dict[str, Any]:
        if (key_spec, key_usage) not in made:
            node = len(made) % cluster.size
            made[(key_spec, key_usage)] = cluster.client(node).create_key(
                KeySpec=key_spec, KeyUsage=key_usage,
                Description=f"{key_spec} {key_usage}")["KeyMetadata"]
        return made[(key_spec, key_usage)]
    yield get


@pytest.fixture(scope="module")
def symmetric_key(cluster: Cluster) -> str:
    return cluster.client(0).create_key()["KeyMetadata"]["KeyId"]


# -- CreateKey / DescribeKey / GetPublicKey -------------------------------------------------------

CREATABLE = [
    ("RSA_2048", "SIGN_VERIFY", {"SigningAlgorithms": RSA_SIGNING}),
    ("RSA_2048", "ENCRYPT_DECRYPT",
     {"EncryptionAlgorithms": ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]}),
    ("RSA_3072", "SIGN_VERIFY", {"SigningAlgorithms": RSA_SIGNING}),
    ("ECC_NIST_P256", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_256"]}),
    ("ECC_NIST_P384", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_384"]}),
    ("ECC_NIST_P521", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_512"]}),
    ("ECC_SECG_P256K1", "SIGN_VERIFY", {"SigningAlgorithms": ["ECDSA_SHA_256"]}),
    ("ECC_NIST_P256", "KEY_AGREEMENT", {"KeyAgreementAlgorithms": ["ECDH"]}),
    ("ECC_NIST_P384", "KEY_AGREEMENT", {"KeyAgreementAlgorithms": ["ECDH"]}),
    ("ECC_NIST_P521", "KEY_AGREEMENT", {"KeyAgreementAlgorithms": ["ECDH"]}),
    ("HMAC_224", "GENERATE_VERIFY_MAC", {"MacAlgorithms": ["HMAC_SHA_224"]}),
    ("HMAC_256", "GENERATE_VERIFY_MAC", {"MacAlgorithms": ["HMAC_SHA_256"]}),
    ("HMAC_384", "GENERATE_VERIFY_MAC", {"MacAlgorithms": ["HMAC_SHA_384"]}),
    ("HMAC_512", "GENERATE_VERIFY_MAC", {"MacAlgorithms": ["HMAC_SHA_512"]}),
]


@pytest.mark.parametrize(("key_spec", "key_usage", "algorithms"), CREATABLE)
def test_create_key_and_its_metadata(cluster: Cluster, key: Callable[..., dict[str, Any]],
                                     key_spec: str, key_usage: str,
                                     algorithms: dict[str, list[str]]) -> None:
    created = key(key_spec, key_usage)
    for node in range(cluster.size):
        described = wait_for(lambda n=node: cluster.client(n).describe_key(
            KeyId=created["KeyId"])["KeyMetadata"], 10, what="the key on every node")
        assert described["KeySpec"] == described["CustomerMasterKeySpec"] == key_spec
        assert described["KeyUsage"] == key_usage
        assert described["KeyState"] == "Enabled" and described["Origin"] == "AWS_KMS"
        # Only the algorithm list of the key's usage; CurrentKeyMaterialId is for symmetric
        # encryption keys only.
        assert {m: described[m] for m in ALGORITHM_MEMBERS if m in described} == algorithms
        assert "CurrentKeyMaterialId" not in described
    if key_usage == "GENERATE_VERIFY_MAC":
        assert error_of(lambda: cluster.client(1).get_public_key(KeyId=created["KeyId"]))[0] \
            == "UnsupportedOperationException"
        return
    public = cluster.client(2).get_public_key(KeyId=created["Arn"])
    assert public["KeyId"] == created["Arn"]
    assert public["KeySpec"] == public["CustomerMasterKeySpec"] == key_spec
    assert public["KeyUsage"] == key_usage
    assert {m: public[m] for m in ALGORITHM_MEMBERS if m in public} == algorithms
    public_key = load_der_public_key(public["PublicKey"])   # DER SubjectPublicKeyInfo
    if key_spec.startswith("RSA_"):
        assert isinstance(public_key, rsa.RSAPublicKey)
        assert public_key.key_size == int(key_spec[4:])
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == CURVES[key_spec].name


def test_symmetric_keys_have_no_public_key(cluster: Cluster, symmetric_key: str) -> None:
    assert error_of(lambda: cluster.client(0).get_public_key(KeyId=symmetric_key))[0] == \
        "UnsupportedOperationException"


@pytest.mark.parametrize(("key_spec", "key_usage"), [
    ("ECC_NIST_EDWARDS25519", "SIGN_VERIFY"),       # SoftHSM2 2.6.1 cannot wrap Ed25519 keys
    ("ML_DSA_44", "SIGN_VERIFY"), ("ML_DSA_87", "SIGN_VERIFY"),
    ("ML_KEM_768", "ENCAPSULATE_DECAPSULATE"), ("SM2", "SIGN_VERIFY"),
])
def test_key_specs_the_token_cannot_hold_are_refused(cluster: Cluster, key_spec: str,
                                                     key_usage: str) -> None:
    before = len(cluster.client(0).list_keys(Limit=1000)["Keys"])
    code, message = error_of(lambda: cluster.client(0).create_key(KeySpec=key_spec,
                                                                 KeyUsage=key_usage))
    assert code == "UnsupportedOperationException"
    assert key_spec in message and "kmsd-node-1" in message   # names the spec and the token
    assert len(cluster.client(0).list_keys(Limit=1000)["Keys"]) == before


@pytest.mark.parametrize(("key_spec", "key_usage", "message"), [
    ("ECC_NIST_P256", "ENCRYPT_DECRYPT",
     "KeyUsage ENCRYPT_DECRYPT is not compatible with KeySpec ECC_NIST_P256"),
    ("ECC_SECG_P256K1", "KEY_AGREEMENT",
     "KeyUsage KEY_AGREEMENT is not compatible with KeySpec ECC_SECG_P256K1"),
    ("HMAC_256", "SIGN_VERIFY", "KeyUsage SIGN_VERIFY is not compatible with KeySpec HMAC_256"),
    ("RSA_2048", "KEY_AGREEMENT", "KeyUsage KEY_AGREEMENT is not compatible with KeySpec RSA_2048"),
    ("SYMMETRIC_DEFAULT", "SIGN_VERIFY",
     "KeyUsage SIGN_VERIFY is not compatible with KeySpec SYMMETRIC_DEFAULT"),
    ("RSA_2048", None,
     "You must specify a KeyUsage value for all KMS keys except for symmetric encryption keys."),
])
def test_wrong_key_usage_for_a_key_spec(cluster: Cluster, key_spec: str, key_usage: str | None,
                                        message: str) -> None:
    params: dict[str, str] = {"KeySpec": key_spec}
    if key_usage is not None:
        params["KeyUsage"] = key_usage
    assert error_of(lambda: cluster.client(1).create_key(**params)) == \
        ("ValidationException", message)


def test_rotation_stays_symmetric_only(cluster: Cluster,
                                       key: Callable[..., dict[str, Any]]) -> None:
    for key_id in (key("ECC_NIST_P256", "SIGN_VERIFY")["KeyId"],
                   key("HMAC_256", "GENERATE_VERIFY_MAC")["KeyId"]):
        assert error_of(lambda k=key_id: cluster.client(0).enable_key_rotation(KeyId=k))[0] == \
            "UnsupportedOperationException"


# -- Sign / Verify ----------------------------------------------------------------------------

SIGNING_CASES = ([("RSA_2048", a) for a in RSA_SIGNING]
                 + [("RSA_3072", "RSASSA_PSS_SHA_512"), ("RSA_3072", "RSASSA_PKCS1_V1_5_SHA_256")]
                 + list(ECDSA.items()))


@pytest.mark.parametrize(("key_spec", "algorithm"), SIGNING_CASES)
def test_signatures_verify_with_the_public_key(cluster: Cluster,
                                               key: Callable[..., dict[str, Any]],
                                               key_spec: str, algorithm: str) -> None:
    key_id = key(key_spec, "SIGN_VERIFY")["KeyId"]
    public_der = cluster.client(2).get_public_key(KeyId=key_id)["PublicKey"]
    digest = hashlib.new("sha" + algorithm[-3:], MESSAGE).digest()
    for node, (message, message_type) in enumerate(((MESSAGE, "RAW"), (digest, "DIGEST"))):
        signed = cluster.client(node).sign(KeyId=key_id, Message=message,
                                           MessageType=message_type, SigningAlgorithm=algorithm)
        assert signed["SigningAlgorithm"] == algorithm
        assert signed["KeyId"] == key(key_spec, "SIGN_VERIFY")["Arn"]
        verify_locally(public_der, algorithm, message, message_type, signed["Signature"])
        # A RAW signature is a signature of the digest, and the other way round.
        verify_locally(public_der, algorithm, digest, "DIGEST", signed["Signature"])
        verified = cluster.client(2 - node).verify(
            KeyId=key_id, Message=message, MessageType=message_type,
            Signature=signed["Signature"], SigningAlgorithm=algorithm)
        assert verified["SignatureValid"] is True
        assert verified["SigningAlgorithm"] == algorithm
        # Verify: "If the signature is not verified, the Verify operation fails with a
        # KMSInvalidSignatureException exception."
        tampered = bytearray(signed["Signature"])
        tampered[len(tampered) // 2] ^= 0x01
        assert error_of(lambda m=message, t=message_type, s=bytes(tampered):
                       cluster.client(1).verify(KeyId=key_id, Message=m, MessageType=t,
                                                Signature=s, SigningAlgorithm=algorithm))[0] \
            == "KMSInvalidSignatureException"


def test_sign_refusals(cluster: Cluster, key: Callable[..., dict[str, Any]],
                       symmetric_key: str) -> None:
    p256 = key("ECC_NIST_P256", "SIGN_VERIFY")
    rsa_signing = key("RSA_2048", "SIGN_VERIFY")
    client = cluster.client(1)
    # The wrong algorithm for the key spec.
    assert error_of(lambda: client.sign(KeyId=p256["KeyId"], Message=MESSAGE,
                                       SigningAlgorithm="ECDSA_SHA_384")) == \
        ("InvalidKeyUsageException",
         "Algorithm ECDSA_SHA_384 is incompatible with key spec ECC_NIST_P256.")
    assert error_of(lambda: client.sign(KeyId=rsa_signing["KeyId"], Message=MESSAGE,
                                       SigningAlgorithm="ECDSA_SHA_256"))[0] == \
        "InvalidKeyUsageException"
    assert error_of(lambda: client.verify(KeyId=p256["KeyId"], Message=MESSAGE, Signature=b"x",
                                         SigningAlgorithm="RSASSA_PSS_SHA_256"))[0] == \
        "InvalidKeyUsageException"
    # MessageType DIGEST: the digest must be exactly the hash's length.
    for bad in (b"\x00" * 31, b"\x00" * 33, b"\x00" * 64):
        assert error_of(lambda d=bad: client.sign(
            KeyId=p256["KeyId"], Message=d, MessageType="DIGEST",
            SigningAlgorithm="ECDSA_SHA_256")) == \
            ("ValidationException", "Digest is invalid length for algorithm ECDSA_SHA_256.")
    assert error_of(lambda: client.sign(
        KeyId=rsa_signing["KeyId"], Message=b"\x01" * 32, MessageType="DIGEST",
        SigningAlgorithm="RSASSA_PSS_SHA_512"))[1] == \
        "Digest is invalid length for algorithm RSASSA_PSS_SHA_512."
    # Sign, Message: "Length Constraints: Minimum length of 1. Maximum length of 4096."
    client.sign(KeyId=p256["KeyId"], Message=b"m" * 4096, SigningAlgorithm="ECDSA_SHA_256")
    code, message = error_of(lambda: client.sign(KeyId=p256["KeyId"], Message=b"m" * 4097,
                                                SigningAlgorithm="ECDSA_SHA_256"))
    assert code == "ValidationException" and "less than or equal to 4096" in message
    # Keys of another usage.
    for other, usage in ((key("RSA_2048", "ENCRYPT_DECRYPT"), "ENCRYPT_DECRYPT"),
                         (key("ECC_NIST_P256", "KEY_AGREEMENT"), "KEY_AGREEMENT"),
                         (key("HMAC_256", "GENERATE_VERIFY_MAC"), "GENERATE_VERIFY_MAC")):
        assert error_of(lambda o=other: client.sign(KeyId=o["KeyId"], Message=MESSAGE,
                                                   SigningAlgorithm="ECDSA_SHA_256")) == \
            ("InvalidKeyUsageException",
             f"{other['Arn']} key usage is {usage} which is not valid for Sign.")
    symmetric_arn = client.describe_key(KeyId=symmetric_key)["KeyMetadata"]["Arn"]
    assert error_of(lambda: client.verify(KeyId=symmetric_key, Message=MESSAGE, Signature=b"s",
                                         SigningAlgorithm="ECDSA_SHA_256")) == \
        ("InvalidKeyUsageException",
         f"{symmetric_arn} key usage is ENCRYPT_DECRYPT which is not valid for Verify.")
    # DryRun: every check, no signature.
    assert error_of(lambda: client.sign(KeyId=p256["KeyId"], Message=MESSAGE, DryRun=True,
                                       SigningAlgorithm="ECDSA_SHA_256"))[0] == \
        "DryRunOperationException"


def test_disabled_keys_neither_sign_nor_show_their_public_key(
        cluster: Cluster) -> None:
    key_id = cluster.client(0).create_key(KeySpec="ECC_NIST_P256",
                                          KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    cluster.client(1).sign(KeyId=key_id, Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256")
    cluster.client(0).disable_key(KeyId=key_id)
    wait_for(lambda: error_of(lambda: cluster.client(2).sign(
        KeyId=key_id, Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256"))[0] ==
        "DisabledException", 10, what="the disabled key refused")
    assert error_of(lambda: cluster.client(1).get_public_key(KeyId=key_id))[0] == \
        "DisabledException"
    cluster.client(0).enable_key(KeyId=key_id)
    wait_for(lambda: cluster.client(2).sign(KeyId=key_id, Message=MESSAGE,
                                            SigningAlgorithm="ECDSA_SHA_256"), 10,
             what="the re-enabled key signs")


def test_identity_policies_govern_sign_and_verify(cluster: Cluster,
                                                  key: Callable[..., dict[str, Any]]) -> None:
    signing = key("ECC_NIST_P384", "SIGN_VERIFY")
    user = cluster.new_user(f"verifier-{uuid.uuid4().hex[:8]}", {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["kms:Verify", "kms:GetPublicKey"],
                       "Resource": signing["Arn"]}]})
    signature = cluster.client(0).sign(KeyId=signing["KeyId"], Message=MESSAGE,
                                       SigningAlgorithm="ECDSA_SHA_384")["Signature"]
    as_user = cluster.as_user(1, user)
    assert as_user.verify(KeyId=signing["KeyId"], Message=MESSAGE, Signature=signature,
                          SigningAlgorithm="ECDSA_SHA_384")["SignatureValid"]
    assert as_user.get_public_key(KeyId=signing["KeyId"])["PublicKey"]
    assert error_of(lambda: as_user.sign(KeyId=signing["KeyId"], Message=MESSAGE,
                                        SigningAlgorithm="ECDSA_SHA_384"))[0] == \
        "AccessDeniedException"


# -- RSA Encrypt / Decrypt / ReEncrypt --------------------------------------------------------

def oaep(algorithm: str) -> padding.OAEP:
    h = hashes.SHA1 if algorithm == "RSAES_OAEP_SHA_1" else hashes.SHA256
    return padding.OAEP(padding.MGF1(h()), h(), None)


@pytest.mark.parametrize("algorithm", ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"])
def test_rsa_ciphertexts_made_locally_decrypt_through_kmsd(
        cluster: Cluster, key: Callable[..., dict[str, Any]], algorithm: str) -> None:
    created = key("RSA_2048", "ENCRYPT_DECRYPT")
    public_key = load_der_public_key(
        cluster.client(1).get_public_key(KeyId=created["KeyId"])["PublicKey"])
    assert isinstance(public_key, rsa.RSAPublicKey)
    # Encrypt, Plaintext: RSA_2048 takes up to 214 bytes with SHA-1, 190 with SHA-256.
    limit = 214 if algorithm == "RSAES_OAEP_SHA_1" else 190
    for plaintext in (b"a", os.urandom(32), os.urandom(limit)):
        if len(plaintext) >= 16:   # long enough to be searched for in the data dirs
            cluster.secrets_seen.append(plaintext)
        ciphertext = public_key.encrypt(plaintext, oaep(algorithm))
        decrypted = cluster.client(2).decrypt(CiphertextBlob=ciphertext, KeyId=created["KeyId"],
                                              EncryptionAlgorithm=algorithm)
        assert decrypted["Plaintext"] == plaintext
        assert decrypted["KeyId"] == created["Arn"]
        assert decrypted["EncryptionAlgorithm"] == algorithm
        # kmsd's own Encrypt gives the raw RSAES-OAEP output (the modulus length), as AWS.
        encrypted = cluster.client(0).encrypt(KeyId=created["KeyId"], Plaintext=plaintext,
                                              EncryptionAlgorithm=algorithm)
        assert encrypted["EncryptionAlgorithm"] == algorithm
        assert len(encrypted["CiphertextBlob"]) == 256
        assert cluster.client(1).decrypt(CiphertextBlob=encrypted["CiphertextBlob"],
                                         KeyId=created["Arn"], EncryptionAlgorithm=algorithm
                                         )["Plaintext"] == plaintext
    code, message = error_of(lambda: cluster.client(0).encrypt(
        KeyId=created["KeyId"], Plaintext=b"x" * (limit + 1), EncryptionAlgorithm=algorithm))
    assert (code, message) == ("ValidationException",
                               f"Algorithm {algorithm} and key spec RSA_2048 cannot encrypt "
                               f"data larger than {limit} bytes.")
    # The other OAEP hash, or a damaged ciphertext: one opaque error.
    other = "RSAES_OAEP_SHA_256" if algorithm == "RSAES_OAEP_SHA_1" else "RSAES_OAEP_SHA_1"
    ciphertext = public_key.encrypt(b"secret", oaep(algorithm))
    damaged = bytes([ciphertext[0] ^ 1]) + ciphertext[1:]
    for blob, used in ((ciphertext, other), (damaged, algorithm), (ciphertext[:-1], algorithm)):
        assert error_of(lambda b=blob, u=used: cluster.client(1).decrypt(
            CiphertextBlob=b, KeyId=created["KeyId"], EncryptionAlgorithm=u)) == \
            ("InvalidCiphertextException", "")


def test_rsa_encryption_refusals(cluster: Cluster, key: Callable[..., dict[str, Any]],
                                 symmetric_key: str) -> None:
    created = key("RSA_2048", "ENCRYPT_DECRYPT")
    client = cluster.client(2)
    ciphertext = client.encrypt(KeyId=created["KeyId"], Plaintext=b"p",
                                EncryptionAlgorithm="RSAES_OAEP_SHA_256")["CiphertextBlob"]
    # Decrypt: "you must specify the KeyId parameter and the EncryptionAlgorithm parameter".
    assert error_of(lambda: client.decrypt(CiphertextBlob=ciphertext,
                                          EncryptionAlgorithm="RSAES_OAEP_SHA_256"))[0] == \
        "ValidationException"
    assert error_of(lambda: client.decrypt(CiphertextBlob=ciphertext,
                                          KeyId=created["KeyId"]))[0] == \
        "InvalidCiphertextException"
    # Algorithms of another key spec, both ways.
    assert error_of(lambda: client.encrypt(KeyId=created["KeyId"], Plaintext=b"p")) == \
        ("InvalidKeyUsageException",
         "Algorithm SYMMETRIC_DEFAULT is incompatible with key spec RSA_2048.")
    assert error_of(lambda: client.encrypt(KeyId=symmetric_key, Plaintext=b"p",
                                          EncryptionAlgorithm="RSAES_OAEP_SHA_1"))[0] == \
        "InvalidKeyUsageException"
    assert error_of(lambda: client.decrypt(CiphertextBlob=ciphertext, KeyId=symmetric_key,
                                          EncryptionAlgorithm="RSAES_OAEP_SHA_256")) == \
        ("InvalidKeyUsageException",
         "Algorithm RSAES_OAEP_SHA_256 is incompatible with key spec SYMMETRIC_DEFAULT.")
    # No encryption context with asymmetric keys.
    assert error_of(lambda: client.encrypt(KeyId=created["KeyId"], Plaintext=b"p",
                                          EncryptionAlgorithm="RSAES_OAEP_SHA_1",
                                          EncryptionContext={"a": "b"}))[0] == \
        "ValidationException"
    # A signing key does not encrypt; an RSA key makes no data keys.
    signing = key("RSA_2048", "SIGN_VERIFY")
    assert error_of(lambda: client.encrypt(KeyId=signing["KeyId"], Plaintext=b"p",
                                          EncryptionAlgorithm="RSAES_OAEP_SHA_1")) == \
        ("InvalidKeyUsageException",
         f"{signing['Arn']} key usage is SIGN_VERIFY which is not valid for Encrypt.")
    assert error_of(lambda: client.generate_data_key(KeyId=created["KeyId"],
                                                    KeySpec="AES_256")) == \
        ("InvalidKeyUsageException",
         f"{created['Arn']} key KeySpec is RSA_2048 which is not valid for GenerateDataKey.")
    assert error_of(lambda: client.encrypt(KeyId=created["KeyId"], Plaintext=b"p", DryRun=True,
                                          EncryptionAlgorithm="RSAES_OAEP_SHA_1"))[0] == \
        "DryRunOperationException"
    assert error_of(lambda: client.decrypt(CiphertextBlob=ciphertext, KeyId=created["KeyId"],
                                          EncryptionAlgorithm="RSAES_OAEP_SHA_256",
                                          DryRun=True))[0] == "DryRunOperationException"


def test_re_encrypt_between_symmetric_and_rsa_keys(cluster: Cluster,
                                                   key: Callable[..., dict[str, Any]],
                                                   symmetric_key: str) -> None:
    created = key("RSA_2048", "ENCRYPT_DECRYPT")
    plaintext = b"moved between key types " + uuid.uuid4().hex.encode()
    cluster.secrets_seen.append(plaintext)
    blob = cluster.client(0).encrypt(KeyId=symmetric_key, Plaintext=plaintext,
                                     EncryptionContext={"k": "v"})["CiphertextBlob"]
    to_rsa = cluster.client(1).re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext={"k": "v"},
        DestinationKeyId=created["KeyId"], DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_256")
    assert to_rsa["KeyId"] == created["Arn"]
    assert to_rsa["SourceEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert to_rsa["DestinationEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
    assert "SourceKeyMaterialId" in to_rsa and "DestinationKeyMaterialId" not in to_rsa
    assert len(to_rsa["CiphertextBlob"]) == 256
    back = cluster.client(2).re_encrypt(
        CiphertextBlob=to_rsa["CiphertextBlob"], SourceKeyId=created["Arn"],
        SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256", DestinationKeyId=symmetric_key,
        DestinationEncryptionContext={"back": "again"})
    assert back["SourceKeyId"] == created["Arn"]
    assert back["SourceEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
    assert cluster.client(0).decrypt(CiphertextBlob=back["CiphertextBlob"],
                                     EncryptionContext={"back": "again"})["Plaintext"] == \
        plaintext
    assert error_of(lambda: cluster.client(1).re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext={"k": "v"},
        DestinationKeyId=created["KeyId"]))[0] == "InvalidKeyUsageException"


# -- GenerateMac / VerifyMac ------------------------------------------------------------------

@pytest.mark.parametrize("bits", [224, 256, 384, 512])
def test_hmac(cluster: Cluster, key: Callable[..., dict[str, Any]], bits: int) -> None:
    created = key(f"HMAC_{bits}", "GENERATE_VERIFY_MAC")
    algorithm = f"HMAC_SHA_{bits}"
    made = cluster.client(0).generate_mac(KeyId=created["KeyId"], Message=MESSAGE,
                                          MacAlgorithm=algorithm)
    assert made["MacAlgorithm"] == algorithm and made["KeyId"] == created["Arn"]
    assert len(made["Mac"]) == bits // 8
    # HMAC is deterministic: every node computes the same MAC from the replicated key.
    for node in (1, 2):
        assert cluster.client(node).generate_mac(KeyId=created["KeyId"], Message=MESSAGE,
                                                 MacAlgorithm=algorithm)["Mac"] == made["Mac"]
    assert cluster.client(0).generate_mac(KeyId=created["KeyId"], Message=MESSAGE + b".",
                                          MacAlgorithm=algorithm)["Mac"] != made["Mac"]
    verified = cluster.client(1).verify_mac(KeyId=created["KeyId"], Message=MESSAGE,
                                            Mac=made["Mac"], MacAlgorithm=algorithm)
    assert verified["MacValid"] is True and verified["MacAlgorithm"] == algorithm
    tampered = bytes([made["Mac"][0] ^ 0x80]) + made["Mac"][1:]
    for bad_mac, message in ((tampered, MESSAGE), (made["Mac"], MESSAGE + b"!"),
                             (made["Mac"][:-1], MESSAGE)):
        # VerifyMac: "If the MAC verification fails, ... a KMSInvalidMacException".
        assert error_of(lambda m=bad_mac, g=message: cluster.client(2).verify_mac(
            KeyId=created["KeyId"], Message=g, Mac=m, MacAlgorithm=algorithm))[0] == \
            "KMSInvalidMacException"
    wrong = "HMAC_SHA_256" if bits != 256 else "HMAC_SHA_384"
    assert error_of(lambda: cluster.client(0).generate_mac(
        KeyId=created["KeyId"], Message=MESSAGE, MacAlgorithm=wrong)) == \
        ("InvalidKeyUsageException", f"Algorithm {wrong} is incompatible with key spec "
                                     f"HMAC_{bits}.")
    assert error_of(lambda: cluster.client(0).generate_mac(
        KeyId=created["KeyId"], Message=MESSAGE, MacAlgorithm=algorithm, DryRun=True))[0] == \
        "DryRunOperationException"


def test_hmac_keys_are_distinct_and_mac_needs_a_mac_key(
        cluster: Cluster, key: Callable[..., dict[str, Any]]) -> None:
    other = cluster.client(1).create_key(KeySpec="HMAC_256",
                                         KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    first = key("HMAC_256", "GENERATE_VERIFY_MAC")
    macs = {cluster.client(0).generate_mac(KeyId=k["KeyId"], Message=MESSAGE,
                                           MacAlgorithm="HMAC_SHA_256")["Mac"]
            for k in (first, other)}
    assert len(macs) == 2
    signing = key("ECC_NIST_P256", "SIGN_VERIFY")
    assert error_of(lambda: cluster.client(0).generate_mac(
        KeyId=signing["KeyId"], Message=MESSAGE, MacAlgorithm="HMAC_SHA_256")) == \
        ("InvalidKeyUsageException",
         f"{signing['Arn']} key usage is SIGN_VERIFY which is not valid for GenerateMac.")


# -- DeriveSharedSecret -----------------------------------------------------------------------

@pytest.mark.parametrize("key_spec", ["ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521"])
def test_ecdh_matches_the_peer_side(cluster: Cluster, key: Callable[..., dict[str, Any]],
                                    key_spec: str) -> None:
    created = key(key_spec, "KEY_AGREEMENT")
    kms_public = load_der_public_key(
        cluster.client(0).get_public_key(KeyId=created["KeyId"])["PublicKey"])
    assert isinstance(kms_public, ec.EllipticCurvePublicKey)
    peer = ec.generate_private_key(CURVES[key_spec])
    peer_der = peer.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    derived = cluster.client(1).derive_shared_secret(
        KeyId=created["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=peer_der)
    expected = peer.exchange(ec.ECDH(), kms_public)
    cluster.secrets_seen.append(expected)
    assert derived["SharedSecret"] == expected
    assert derived["KeyId"] == created["Arn"]
    assert derived["KeyAgreementAlgorithm"] == "ECDH" and derived["KeyOrigin"] == "AWS_KMS"
    # Another node, same answer.
    assert cluster.client(2).derive_shared_secret(
        KeyId=created["Arn"], KeyAgreementAlgorithm="ECDH",
        PublicKey=peer_der)["SharedSecret"] == expected
    # A peer key on another curve, or no key at all.
    other_curve = ec.SECP384R1() if key_spec != "ECC_NIST_P384" else ec.SECP256R1()
    wrong = ec.generate_private_key(other_curve).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    edwards = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for bad in (wrong, edwards, b"not a public key", peer_der[:-1]):
        assert error_of(lambda b=bad: cluster.client(0).derive_shared_secret(
            KeyId=created["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=b))[0] == \
            "ValidationException"
    assert error_of(lambda: cluster.client(0).derive_shared_secret(
        KeyId=created["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=peer_der,
        DryRun=True))[0] == "DryRunOperationException"


def test_key_agreement_needs_a_key_agreement_key(cluster: Cluster,
                                                 key: Callable[..., dict[str, Any]]) -> None:
    signing = key("ECC_NIST_P256", "SIGN_VERIFY")
    agreeing = key("ECC_NIST_P256", "KEY_AGREEMENT")
    peer_der = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert error_of(lambda: cluster.client(0).derive_shared_secret(
        KeyId=signing["KeyId"], KeyAgreementAlgorithm="ECDH", PublicKey=peer_der)) == \
        ("InvalidKeyUsageException",
         f"{signing['Arn']} key usage is SIGN_VERIFY which is not valid for DeriveSharedSecret.")
    assert error_of(lambda: cluster.client(0).sign(
        KeyId=agreeing["KeyId"], Message=MESSAGE, SigningAlgorithm="ECDSA_SHA_256"))[0] == \
        "InvalidKeyUsageException"


# -- GenerateDataKeyPair* ---------------------------------------------------------------------

DATA_KEY_PAIR_SPECS = ["RSA_2048", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521",
                       "ECC_SECG_P256K1", "ECC_NIST_EDWARDS25519"]


@pytest.mark.parametrize("key_pair_spec", DATA_KEY_PAIR_SPECS)
def test_data_key_pairs(cluster: Cluster, symmetric_key: str, key_pair_spec: str) -> None:
    context = {"purpose": "data key pair", "spec": key_pair_spec}
    pair = cluster.client(0).generate_data_key_pair(KeyId=symmetric_key,
                                                    KeyPairSpec=key_pair_spec,
                                                    EncryptionContext=context)
    cluster.secrets_seen.append(pair["PrivateKeyPlaintext"])
    assert pair["KeyPairSpec"] == key_pair_spec
    assert pair["KeyId"].endswith(symmetric_key)
    private_key = load_der_private_key(pair["PrivateKeyPlaintext"], None)   # PKCS#8 DER
    public_der = private_key.public_key().public_bytes(Encoding.DER,
                                                       PublicFormat.SubjectPublicKeyInfo)
    assert public_der == pair["PublicKey"]
    # "To decrypt the private key, pass the PrivateKeyCiphertextBlob to Decrypt".
    decrypted = cluster.client(1).decrypt(CiphertextBlob=pair["PrivateKeyCiphertextBlob"],
                                          EncryptionContext=context)
    assert decrypted["Plaintext"] == pair["PrivateKeyPlaintext"]
    assert error_of(lambda: cluster.client(1).decrypt(
        CiphertextBlob=pair["PrivateKeyCiphertextBlob"]))[0] == "InvalidCiphertextException"

    without = cluster.client(2).generate_data_key_pair_without_plaintext(
        KeyId=symmetric_key, KeyPairSpec=key_pair_spec)
    assert "PrivateKeyPlaintext" not in without
    private_der = cluster.client(0).decrypt(
        CiphertextBlob=without["PrivateKeyCiphertextBlob"])["Plaintext"]
    cluster.secrets_seen.append(private_der)
    assert load_der_private_key(private_der, None).public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo) == without["PublicKey"]
    assert without["PublicKey"] != pair["PublicKey"]


def test_data_key_pair_refusals(cluster: Cluster, key: Callable[..., dict[str, Any]],
                                symmetric_key: str) -> None:
    client = cluster.client(1)
    for spec in ("SM2", "ML_KEM_768"):
        code, message = error_of(lambda s=spec: client.generate_data_key_pair(
            KeyId=symmetric_key, KeyPairSpec=s))
        assert code == "UnsupportedOperationException" and spec in message
    rsa_key = key("RSA_2048", "ENCRYPT_DECRYPT")
    assert error_of(lambda: client.generate_data_key_pair(
        KeyId=rsa_key["KeyId"], KeyPairSpec="ECC_NIST_P256")) == \
        ("InvalidKeyUsageException",
         f"{rsa_key['Arn']} key KeySpec is RSA_2048 which is not valid for GenerateDataKeyPair.")
    signing = key("ECC_NIST_P256", "SIGN_VERIFY")
    assert error_of(lambda: client.generate_data_key_pair_without_plaintext(
        KeyId=signing["KeyId"], KeyPairSpec="ECC_NIST_P256"))[0] == "InvalidKeyUsageException"
    assert error_of(lambda: client.generate_data_key_pair(
        KeyId=symmetric_key, KeyPairSpec="ECC_NIST_P256", DryRun=True))[0] == \
        "DryRunOperationException"


# -- the event loop, the helper process, the token's capabilities --------------------------------

def _healthz_seconds(cluster: Cluster, node: int) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(cluster.info["endpoints"][node] + "/healthz",
                                timeout=10) as response:
        assert response.status == 200
    return time.perf_counter() - started


def test_rsa_4096_key_generation_does_not_block_the_node(cluster: Cluster) -> None:
    """The node keeps answering while its HSM helper process generates an RSA-4096 key
    (0.8-4.6 s on SoftHSM2): /healthz, served by the same event loop, stays fast."""
    baseline = sorted(_healthz_seconds(cluster, 0) for _ in range(20))
    created: dict[str, Any] = {}

    def create() -> None:
        started = time.perf_counter()
        created["metadata"] = cluster.client(0, retries=1).create_key(
            KeySpec="RSA_4096", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
        created["seconds"] = time.perf_counter() - started

    thread = threading.Thread(target=create)
    thread.start()
    during = []
    while thread.is_alive():
        during.append(_healthz_seconds(cluster, 0))
        time.sleep(0.005)
    thread.join()
    assert "metadata" in created, "CreateKey RSA_4096 failed"
    assert len(during) >= 5, f"only {len(during)} probes in {created['seconds']:.2f}s"
    # An inline RSA-4096 keygen would hold /healthz for about the whole generation (0.8-4.6 s).
    # ~30 ms is typical here; the bound leaves room for a 2-core machine other test runs load.
    worst, seconds = max(during), created["seconds"]
    assert worst < 0.25 or worst < min(0.5, seconds / 3), (
        f"/healthz took {worst * 1000:.0f} ms while RSA-4096 generated for {seconds:.2f}s "
        f"(baseline median {baseline[10] * 1000:.1f} ms)")
    # The key works, and decrypting with it (RSA-4096: in the helper process) does too.
    key_id = created["metadata"]["KeyId"]
    public_key = load_der_public_key(cluster.client(1).get_public_key(KeyId=key_id)["PublicKey"])
    assert isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size == 4096
    plaintext = os.urandom(446)   # RSA_4096 with RSAES_OAEP_SHA_256 takes up to 446 bytes
    cluster.secrets_seen.append(plaintext)
    ciphertext = public_key.encrypt(plaintext, oaep("RSAES_OAEP_SHA_256"))
    for node in range(cluster.size):
        assert cluster.client(node).decrypt(
            CiphertextBlob=ciphertext, KeyId=key_id,
            EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"] == plaintext


def test_hsm_capabilities_through_the_admin_api_and_kmsctl(cluster: Cluster) -> None:
    report = cluster.admin_get(1, "/v1/hsm/capabilities")
    assert report["token_label"] == "kmsd-node-2"
    paths = {entry["name"]: entry["path"] for entry in report["capabilities"]}
    # SoftHSM2 2.6.1 (FACTS.md §0, §C): OAEP with SHA-1 only, ECDSA over a digest only,
    # no wrapping of Ed25519 keys, nothing post-quantum, no SM2.
    assert paths["RSAES_OAEP_SHA_1"] == "in-token"
    assert paths["RSAES_OAEP_SHA_256"] == "raw-in-token+host-decoding"
    assert paths["ECDSA_SHA_256"] == "host-hash+in-token-sign"
    assert paths["RSASSA_PSS_SHA_512"] == paths["HMAC_SHA_224"] == paths["ECDH"] == "in-token"
    for name in ("ECC_NIST_EDWARDS25519", "ML_DSA_44", "ML_KEM_768", "SM2", "SM2DSA"):
        assert paths[name] == "unsupported"
    assert report["helper_process"]["enabled"] is True
    env = {**os.environ, "AWS_ACCESS_KEY_ID": cluster.info["access_key_id"],
           "AWS_SECRET_ACCESS_KEY": cluster.info["secret_access_key"],
           "KMSD_ADMIN_ENDPOINT": cluster.info["admin_endpoints"][0]}
    kmsctl = [sys.executable, "-m", "kmsd.kmsctl"]
    table = subprocess.run([*kmsctl, "hsm", "capabilities", "--node", "node-3"], env=env,
                           capture_output=True, text=True, check=True, timeout=30).stdout
    assert "kmsd-node-3" in table and "KIND" in table and "PATH" in table
    assert any(line.split()[:3] == ["encryption_algorithm", "RSAES_OAEP_SHA_256",
                                    "raw-in-token+host-decoding"]
               for line in table.splitlines() if line.strip())
    as_json = json.loads(subprocess.run([*kmsctl, "--json", "hsm", "capabilities"], env=env,
                                        capture_output=True, text=True, check=True,
                                        timeout=30).stdout)
    assert as_json["token_label"] == "kmsd-node-1"


def test_no_private_key_or_plaintext_in_any_data_dir(cluster: Cluster, symmetric_key: str) -> None:
    """Data key pairs' private keys, decrypted plaintexts and ECDH secrets seen by this module
    (and everything else the session saw) appear in no file under any node's data dir."""
    pair = cluster.client(0).generate_data_key_pair(KeyId=symmetric_key,
                                                    KeyPairSpec="ECC_NIST_P256")
    private_key = load_der_private_key(pair["PrivateKeyPlaintext"], None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    scalar = private_key.private_numbers().private_value.to_bytes(32, "big")
    secrets = [*cluster.secrets_seen, pair["PrivateKeyPlaintext"], scalar]
    files = [os.path.join(directory, name)
             for directory, _, names in os.walk(cluster.data_dir) for name in names]
    assert any(path.endswith("raft.journal") for path in files)
    for path in files:
        for content in stored_views(path):
            for secret in secrets:
                assert secret not in content, f"a private key or plaintext is in {path}"


def _helper_pids(node_pid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                command = cmd.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == node_pid and b"spawn_main" in command:
            pids.append(int(entry))
    return pids


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_helper_process_lives_and_dies_with_its_node(own_cluster: Cluster) -> None:
    node = 1
    helpers = wait_for(lambda: _helper_pids(own_cluster.pid(node)), 30,
                       what="the node's HSM helper process")
    assert len(helpers) == 1
    signing = own_cluster.client(0).create_key(KeySpec="RSA_3072",
                                               KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    own_cluster.kill(node)   # kill -9: the node cannot stop its helper itself
    wait_for(lambda: not _running(helpers[0]), 10, what="the orphaned helper to exit")
    own_cluster.restart(node)
    assert wait_for(lambda: _helper_pids(own_cluster.pid(node)), 30, what="a new helper")
    # RSA-3072 signing runs in the new helper, with its own login to the token.
    public_der = own_cluster.client(0).get_public_key(KeyId=signing["KeyId"])["PublicKey"]
    signature = wait_for(lambda: own_cluster.client(node).sign(
        KeyId=signing["KeyId"], Message=MESSAGE,
        SigningAlgorithm="RSASSA_PSS_SHA_384")["Signature"], 30, what="a signature")
    verify_locally(public_der, "RSASSA_PSS_SHA_384", MESSAGE, "RAW", signature)
