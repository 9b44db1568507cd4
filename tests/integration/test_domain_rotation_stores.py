"""Domain-key rotation on a live 3-node cluster with a connected custom key store (and a key
in it) and imported key material (symmetric, HMAC, EC, plus import parameters not used yet).

What a rotation must do with them: a store key's backing key is wrapped under the store's
own key, so the rotation neither counts nor re-wraps it and does not wait for it; the
store's KeyStorePassword is sealed under the domain key, so it is counted and re-sealed,
and the store still connects once the old generation is destroyed; imported material and
import wrapping keys are re-wrapped like generated keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration.harness import Cluster, start_cluster, wait_for
from tests.integration.test_custom_key_stores import (
    STORE_TOKEN,
    TRUST_ANCHOR,
    _decrypt,
    _state_everywhere,
)
from tests.integration.test_domain_rotation import domain_status, kmsctl, token_labels
from tests.integration.test_import_asymmetric import (
    external_key,
    import_material,
    on_every_node,
    pkcs8,
    spki,
    wrap,
)


@pytest.fixture()
def store_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(str(tmp_path_factory.mktemp("rotation-stores")),
                            extra_args=("--key-store-token", STORE_TOKEN))
    yield running
    running.stop()


def _blobs(cluster: Cluster, node: int = 0) -> dict[int, int]:
    return {g["Generation"]: g["Blobs"] for g in domain_status(cluster, node)["Generations"]}


def _counted(cluster: Cluster, expected: dict[int, int]) -> None:
    """`kmsctl domain status`'s blob counts reach `expected` (node 0 applies what other
    nodes committed a moment later)."""
    wait_for(lambda: _blobs(cluster) == expected, 10, what=f"blob counts {expected}")


def test_rotation_with_a_custom_key_store_and_imported_keys(store_cluster: Cluster) -> None:
    cluster = store_cluster
    kms = cluster.client(0)
    counted = _blobs(cluster)[1]

    # A connected store with a key in it: its password counts as one blob of generation 1,
    # the key (under the store key) as none.
    store_id = kms.create_custom_key_store(
        CustomKeyStoreName="rotated", CloudHsmClusterId=STORE_TOKEN,
        KeyStorePassword=cluster.info["key_store_tokens"][STORE_TOKEN],
        TrustAnchorCertificate=TRUST_ANCHOR)["CustomKeyStoreId"]
    _counted(cluster, {1: counted + 1})
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(cluster, store_id, "CONNECTED")
    store_key = kms.create_key(CustomKeyStoreId=store_id,
                               Origin="AWS_CLOUDHSM")["KeyMetadata"]["KeyId"]
    in_store = kms.encrypt(KeyId=store_key, Plaintext=b"in the store")["CiphertextBlob"]
    _counted(cluster, {1: counted + 1})

    # Imported material: symmetric, HMAC and EC; and import parameters fetched now, used
    # only after the rotation (their wrapping key is re-wrapped meanwhile).
    symmetric, aes = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"], os.urandom(32)
    import_material(cluster, symmetric, aes, "RSAES_OAEP_SHA_256")
    mac_key, mac_material = external_key(cluster, "HMAC_256", "GENERATE_VERIFY_MAC"), \
        os.urandom(32)
    import_material(cluster, mac_key, mac_material, "RSA_AES_KEY_WRAP_SHA_1", node=1)
    signing, private_key = external_key(cluster, "ECC_NIST_P256", "SIGN_VERIFY"), \
        ec.generate_private_key(ec.SECP256R1())
    import_material(cluster, signing, pkcs8(private_key), "RSA_AES_KEY_WRAP_SHA_256")
    later = kms.create_key(Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    later_params = kms.get_parameters_for_import(KeyId=later,
                                                 WrappingAlgorithm="RSA_AES_KEY_WRAP_SHA_256",
                                                 WrappingKeySpec="RSA_2048")
    imported_blob = on_every_node(cluster, lambda c: c.encrypt(
        KeyId=symmetric, Plaintext=b"imported")["CiphertextBlob"], "Encrypt")[0]
    # 3 imported keys, 4 import wrapping keys, the store's password, and what was there.
    _counted(cluster, {1: counted + 8})

    rotated = kmsctl(cluster, "domain", "rotate", "--timeout", "60")
    assert rotated.returncode == 0, rotated.stderr + rotated.stdout
    after = domain_status(cluster, 2)
    states = {g["Generation"]: (g["State"], g["Blobs"]) for g in after["Generations"]}
    # Retired although the store key's blob reads like a bare generation-1 blob.
    assert states == {1: ("retired", 0), 2: ("active", counted + 8)}, states
    for node in range(cluster.size):
        labels = token_labels(cluster, node)
        assert [label for label in labels if label.startswith("kmsd-")] == \
            ["kmsd-domain-key-g2"], labels

    # The store key is untouched and works on every node; so does a new one.
    for node in range(cluster.size):
        assert _decrypt(cluster, node, in_store) == b"in the store"
    assert kms.describe_key(KeyId=store_key)["KeyMetadata"]["KeyState"] == "Enabled"
    second = cluster.client(1).create_key(CustomKeyStoreId=store_id,
                                          Origin="AWS_CLOUDHSM")["KeyMetadata"]["KeyId"]
    _counted(cluster, {1: 0, 2: counted + 8})
    # Its password, re-sealed under generation 2, still opens the store's token.
    cluster.client(2).disconnect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(cluster, store_id, "DISCONNECTED")
    cluster.client(1).connect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(cluster, store_id, "CONNECTED")
    for node in range(cluster.size):
        assert wait_for(lambda n=node: _decrypt(cluster, n, in_store), 20,
                        what=f"store decrypt on node {node}") == b"in the store"
    assert cluster.client(0).decrypt(CiphertextBlob=cluster.client(2).encrypt(
        KeyId=second, Plaintext=b"second")["CiphertextBlob"])["Plaintext"] == b"second"
    # A password changed now is sealed under generation 2 and accepted.
    kms.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(cluster, store_id, "DISCONNECTED")
    kms.update_custom_key_store(CustomKeyStoreId=store_id,
                                KeyStorePassword=cluster.info["key_store_tokens"][STORE_TOKEN])
    kms.connect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(cluster, store_id, "CONNECTED")

    # Imported keys work everywhere with their re-wrapped material.
    for node in range(cluster.size):
        client = cluster.client(node)
        assert client.decrypt(CiphertextBlob=imported_blob)["Plaintext"] == b"imported"
        assert client.generate_mac(KeyId=mac_key, Message=b"m", MacAlgorithm="HMAC_SHA_256"
                                   )["Mac"] == hmac.new(mac_material, b"m",
                                                        hashlib.sha256).digest()
        signature = client.sign(KeyId=signing, Message=b"after",
                                SigningAlgorithm="ECDSA_SHA_256")["Signature"]
        private_key.public_key().verify(signature, b"after", ec.ECDSA(hashes.SHA256()))
        assert client.get_public_key(KeyId=signing)["PublicKey"] == spki(private_key)
    # The same material again (compared by check value) is still the same key's.
    import_material(cluster, symmetric, aes, "RSA_AES_KEY_WRAP_SHA_1", node=2)
    # Parameters fetched before the rotation: their wrapping key was re-wrapped.
    later_material = os.urandom(32)
    kms.import_key_material(
        KeyId=later, ImportToken=later_params["ImportToken"],
        EncryptedKeyMaterial=wrap(later_params["PublicKey"], "RSA_AES_KEY_WRAP_SHA_256",
                                  later_material),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE")
    blob = kms.encrypt(KeyId=later, Plaintext=b"later")["CiphertextBlob"]
    assert on_every_node(cluster, lambda c: c.decrypt(CiphertextBlob=blob)["Plaintext"],
                         "Decrypt") == [b"later"] * cluster.size
    _counted(cluster, {1: 0, 2: counted + 9})
