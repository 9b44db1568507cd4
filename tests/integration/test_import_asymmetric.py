"""Imported HMAC and asymmetric key material on a real three-node cluster, and every node
forgetting deleted material.

Material is made and wrapped locally with `cryptography`, as AWS's "Step 3: Encrypt the
key material" guide has customers do with openssl. AWS references: GetParametersForImport
WrappingAlgorithm ("To import an RSA private key, you must use an RSA_AES wrapping
algorithm"; "You cannot use the RSAES_OAEP_SHA_1 wrapping algorithm with the RSA_2048
wrapping key spec to wrap ECC_NIST_P521 key material"; "RSAES_PKCS1_V1_5 (Deprecated) -- As
of October 10, 2023, KMS does not support the RSAES_PKCS1_V1_5 wrapping algorithm");
ImportKeyMaterial ("For asymmetric and HMAC keys, you cannot change the key material after
the initial import"); "AWS KMS derives the public key from the private key".
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from tests.integration.harness import Cluster, error_of, wait_for

_HASH = {"SHA_1": hashes.SHA1, "SHA_256": hashes.SHA256}


def wrap(public_key_der: bytes, algorithm: str, material: bytes) -> bytes:
    h = _HASH["SHA_1" if algorithm.endswith("SHA_1") else "SHA_256"]
    oaep = padding.OAEP(padding.MGF1(h()), h(), None)
    public_key = serialization.load_der_public_key(public_key_der)
    assert isinstance(public_key, rsa.RSAPublicKey)
    if algorithm.startswith("RSAES_OAEP"):
        return public_key.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public_key.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)


def pkcs8(private_key: PrivateKeyTypes) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def spki(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def external_key(cluster: Cluster, spec: str, usage: str) -> str:
    return cluster.client(0).create_key(Origin="EXTERNAL", KeySpec=spec,
                                        KeyUsage=usage)["KeyMetadata"]["KeyId"]


def import_material(cluster: Cluster, key_id: str, material: bytes, algorithm: str,
                    spec: str = "RSA_2048", node: int = 0) -> dict[str, Any]:
    client = cluster.client(node)
    params = client.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm=algorithm,
                                              WrappingKeySpec=spec)
    return client.import_key_material(
        KeyId=key_id, ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrap(params["PublicKey"], algorithm, material),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")


def on_every_node(cluster: Cluster, call: Any, what: str) -> list[Any]:
    """`call(client)` on each node, retried until that node has applied the import."""
    def attempt(node: int) -> Any:
        try:
            return call(cluster.client(node))
        except ClientError as error:
            if error.response["Error"]["Code"] in ("KMSInvalidStateException",
                                                   "NotFoundException"):
                return None
            raise
    return [wait_for(lambda n=node: attempt(n), 20, what=f"{what} on node {node}")
            for node in range(cluster.size)]


def test_hmac_import_generates_macs_on_every_node(cluster: Cluster) -> None:
    key_id = external_key(cluster, "HMAC_384", "GENERATE_VERIFY_MAC")
    material = os.urandom(48)
    # RSAES_OAEP_SHA_256: on SoftHSM2 2.6.1 the raw RSA runs in the token, OAEP on the host.
    response = import_material(cluster, key_id, material, "RSAES_OAEP_SHA_256", node=1)
    assert "KeyMaterialId" not in response  # symmetric encryption keys only
    expected = hmac.new(material, b"message", hashlib.sha384).digest()
    macs = on_every_node(cluster, lambda c: c.generate_mac(
        KeyId=key_id, Message=b"message", MacAlgorithm="HMAC_SHA_384")["Mac"], "GenerateMac")
    assert macs == [expected] * cluster.size
    assert cluster.client(2).verify_mac(KeyId=key_id, Message=b"message",
                                        MacAlgorithm="HMAC_SHA_384", Mac=expected)["MacValid"]
    # Too short for HMAC_384 (at least the hash's 48 bytes): refused, nothing changes.
    other = external_key(cluster, "HMAC_384", "GENERATE_VERIFY_MAC")
    assert error_of(lambda: import_material(cluster, other, os.urandom(40),
                                            "RSA_AES_KEY_WRAP_SHA_1"))[0] == \
        "IncorrectKeyMaterialException"
    assert cluster.client(0).describe_key(KeyId=other)["KeyMetadata"]["KeyState"] == \
        "PendingImport"


def test_ec_import_signs_on_every_node(cluster: Cluster) -> None:
    for spec, curve, algorithm in (("ECC_NIST_P256", ec.SECP256R1(), "RSAES_OAEP_SHA_1"),
                                   ("ECC_SECG_P256K1", ec.SECP256K1(),
                                    "RSA_AES_KEY_WRAP_SHA_256")):
        key_id = external_key(cluster, spec, "SIGN_VERIFY")
        assert error_of(lambda k=key_id: cluster.client(1).get_public_key(KeyId=k))[0] == \
            "KMSInvalidStateException"
        private_key = ec.generate_private_key(curve)
        import_material(cluster, key_id, pkcs8(private_key), algorithm)
        public_keys = on_every_node(cluster, lambda c, k=key_id: c.get_public_key(
            KeyId=k)["PublicKey"], "GetPublicKey")
        assert public_keys == [spki(private_key)] * cluster.size
        signatures = on_every_node(cluster, lambda c, k=key_id: c.sign(
            KeyId=k, Message=b"to sign", SigningAlgorithm="ECDSA_SHA_256")["Signature"],
            "Sign")
        for signature in signatures:
            # Verified with the customer's own key: the imported key signs.
            private_key.public_key().verify(signature, b"to sign", ec.ECDSA(hashes.SHA256()))
        assert cluster.client(2).verify(KeyId=key_id, Message=b"to sign",
                                        SigningAlgorithm="ECDSA_SHA_256",
                                        Signature=signatures[0])["SignatureValid"]


def test_ec_p521_wrapping_limits(cluster: Cluster) -> None:
    key_id = external_key(cluster, "ECC_NIST_P521", "KEY_AGREEMENT")
    assert error_of(lambda: cluster.client(0).get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm="RSAES_OAEP_SHA_1",
        WrappingKeySpec="RSA_2048"))[0] == "UnsupportedOperationException"
    private_key = ec.generate_private_key(ec.SECP521R1())
    import_material(cluster, key_id, pkcs8(private_key), "RSAES_OAEP_SHA_1", spec="RSA_3072")
    peer = ec.generate_private_key(ec.SECP521R1())
    secrets = on_every_node(cluster, lambda c: c.derive_shared_secret(
        KeyId=key_id, KeyAgreementAlgorithm="ECDH", PublicKey=spki(peer))["SharedSecret"],
        "DeriveSharedSecret")
    assert secrets == [peer.exchange(ec.ECDH(), private_key.public_key())] * cluster.size


def test_rsa_import_signs_and_decrypts_on_every_node(cluster: Cluster) -> None:
    signing = external_key(cluster, "RSA_2048", "SIGN_VERIFY")
    for algorithm in ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "RSAES_PKCS1_V1_5"):
        # RSA private keys need an RSA_AES wrapping algorithm; PKCS#1 v1.5 is gone at AWS.
        assert error_of(lambda a=algorithm: cluster.client(0).get_parameters_for_import(
            KeyId=signing, WrappingAlgorithm=a, WrappingKeySpec="RSA_4096"))[0] == \
            "UnsupportedOperationException"
    private_key = rsa.generate_private_key(65537, 2048)
    import_material(cluster, signing, pkcs8(private_key), "RSA_AES_KEY_WRAP_SHA_256")
    for signature in on_every_node(cluster, lambda c: c.sign(
            KeyId=signing, Message=b"m", SigningAlgorithm="RSASSA_PSS_SHA_256")["Signature"],
            "Sign"):
        private_key.public_key().verify(signature, b"m", padding.PSS(
            padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    # The same material again is accepted; other material is not (AWS: it cannot change).
    import_material(cluster, signing, pkcs8(private_key), "RSA_AES_KEY_WRAP_SHA_1", node=2)
    assert error_of(lambda: import_material(
        cluster, signing, pkcs8(rsa.generate_private_key(65537, 2048)),
        "RSA_AES_KEY_WRAP_SHA_1"))[0] == "IncorrectKeyMaterialException"

    decrypting = external_key(cluster, "RSA_3072", "ENCRYPT_DECRYPT")
    other_key = rsa.generate_private_key(65537, 3072)
    import_material(cluster, decrypting, pkcs8(other_key), "RSA_AES_KEY_WRAP_SHA_1",
                    spec="RSA_4096")
    ciphertext = other_key.public_key().encrypt(
        b"for kmsd", padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    plaintexts = on_every_node(cluster, lambda c: c.decrypt(
        KeyId=decrypting, CiphertextBlob=ciphertext,
        EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"], "Decrypt")
    assert plaintexts == [b"for kmsd"] * cluster.size
    # Deleted material: the key is pending import everywhere, and the same key comes back.
    cluster.client(1).delete_imported_key_material(KeyId=decrypting)
    assert error_of(lambda: cluster.client(1).get_public_key(KeyId=decrypting))[0] == \
        "KMSInvalidStateException"
    import_material(cluster, decrypting, pkcs8(other_key), "RSA_AES_KEY_WRAP_SHA_256")
    assert cluster.client(0).get_public_key(KeyId=decrypting)["PublicKey"] == spki(other_key)


def test_key_material_of_another_kind_is_refused(cluster: Cluster) -> None:
    key_id = external_key(cluster, "ECC_NIST_P256", "SIGN_VERIFY")
    wrong = pkcs8(ec.generate_private_key(ec.SECP384R1()))
    assert error_of(lambda: import_material(cluster, key_id, wrong,
                                            "RSA_AES_KEY_WRAP_SHA_1"))[0] == \
        "IncorrectKeyMaterialException"
    assert cluster.client(0).describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == \
        "PendingImport"
    params = cluster.client(0).get_parameters_for_import(
        KeyId=key_id, WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_1", WrappingKeySpec="RSA_2048")
    assert error_of(lambda: cluster.client(0).import_key_material(
        KeyId=key_id, ImportToken=params["ImportToken"], ImportType="EXISTING_KEY_MATERIAL",
        EncryptedKeyMaterial=wrap(params["PublicKey"], "RSA_AES_KEY_WRAP_SHA_1", wrong),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE"))[0] == "ValidationException"


def _cached_handles(cluster: Cluster, node: int) -> int:
    status = cluster.node_status(node)
    assert status is not None
    return int(status["hsm"]["cached_handles"])


def test_deleted_material_leaves_every_node(cluster: Cluster) -> None:
    """DeleteImportedKeyMaterial served by node 0: nodes 1 and 2, which had used the
    material, drop their HSM handles for it when they apply the deletion."""
    symmetric = cluster.client(0).create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    import_material(cluster, symmetric, os.urandom(32), "RSAES_OAEP_SHA_1")
    mac_key = external_key(cluster, "HMAC_256", "GENERATE_VERIFY_MAC")
    import_material(cluster, mac_key, os.urandom(32), "RSAES_OAEP_SHA_1")
    blob = cluster.client(0).encrypt(KeyId=symmetric, Plaintext=b"p")["CiphertextBlob"]
    on_every_node(cluster, lambda c: c.decrypt(CiphertextBlob=blob)["Plaintext"], "Decrypt")
    on_every_node(cluster, lambda c: c.generate_mac(KeyId=mac_key, Message=b"m",
                                                    MacAlgorithm="HMAC_SHA_256"), "GenerateMac")
    before = {node: _cached_handles(cluster, node) for node in (1, 2)}
    cluster.client(0).delete_imported_key_material(KeyId=symmetric)
    cluster.client(0).delete_imported_key_material(KeyId=mac_key)
    for node in (1, 2):
        wait_for(lambda n=node: _cached_handles(cluster, n) <= before[n] - 2, 20,
                 what=f"node {node} to drop the deleted material's handles")
        assert error_of(lambda n=node: cluster.client(n).decrypt(CiphertextBlob=blob)) == \
            ("KMSInvalidStateException",
             f"arn:aws:kms:{cluster.region}:{cluster.info['account_id']}:key/{symmetric} "
             "is pending import.")
