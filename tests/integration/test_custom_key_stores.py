"""Custom key stores (CloudHSM type, PKCS#11 tokens) on a real three-node cluster whose
nodes each hold a token labelled STORE_TOKEN with the same store key (`kmsd dev
--key-store-token`).

AWS references: CreateKey ("To create a KMS key in an CloudHSM key store ... set this value
to AWS_CLOUDHSM. You must also use the CustomKeyStoreId parameter"; "The ConnectionState of
the custom key store must be CONNECTED"), CustomKeyStoreInvalidStateException's conditions,
DisconnectCustomKeyStore ("all attempts to create KMS keys in the custom key store or to use
existing KMS keys in cryptographic operations will fail"), the key state table (Unavailable:
"KMSInvalidStateException: <CMK ARN> is unavailable."), UpdateCustomKeyStore (only the name
while connected), DeleteCustomKeyStore (CustomKeyStoreHasCMKsException).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.harness import Cluster, error_of, start_cluster, wait_for

STORE_TOKEN = "cluster-kmsdstoreaaa"
# Provisioned like STORE_TOKEN, but with a store key of its own: an unrelated "cluster".
UNRELATED_TOKEN = "cluster-kmsdstorebbb"
MISSING_TOKEN = "cluster-kmsdnowhereb"
TRUST_ANCHOR = ("-----BEGIN CERTIFICATE-----\nMIIB (kmsd does not check it)\n"
                "-----END CERTIFICATE-----")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(str(tmp_path_factory.mktemp("key-stores")),
                            extra_args=("--key-store-token", STORE_TOKEN,
                                        "--key-store-token", UNRELATED_TOKEN))
    yield running
    running.stop()


def _password(cluster: Cluster) -> str:
    return cluster.info["key_store_tokens"][STORE_TOKEN]


def _describe(cluster: Cluster, node: int, store_id: str) -> dict[str, Any] | None:
    try:
        found = cluster.client(node).describe_custom_key_stores(CustomKeyStoreId=store_id)
    except ClientError:
        return None
    return found["CustomKeyStores"][0]


def _state_everywhere(cluster: Cluster, store_id: str, state: str) -> None:
    for node in range(cluster.size):
        wait_for(lambda n=node: (_describe(cluster, n, store_id) or {}).get(
            "ConnectionState") == state, 20, what=f"{state} on node {node}")


def _decrypt(cluster: Cluster, node: int, blob: bytes) -> bytes | None:
    try:
        return cluster.client(node).decrypt(CiphertextBlob=blob)["Plaintext"]
    except ClientError:
        return None


def test_external_key_stores_are_unsupported(stores: Cluster) -> None:
    client = stores.client(0)
    code, message = error_of(lambda: client.create_custom_key_store(
        CustomKeyStoreName="xks", CustomKeyStoreType="EXTERNAL_KEY_STORE"))
    assert code == "UnsupportedOperationException" and "EXTERNAL_KEY_STORE" in message
    assert error_of(lambda: client.create_key(Origin="EXTERNAL_KEY_STORE",
                                              CustomKeyStoreId="cks-1234567890abcdef0",
                                              XksKeyId="abc"))[0] == \
        "UnsupportedOperationException"


def test_store_lifecycle_and_keys_on_every_node(stores: Cluster) -> None:
    client = stores.client(0)
    store_id = client.create_custom_key_store(
        CustomKeyStoreName="primary", CloudHsmClusterId=STORE_TOKEN,
        KeyStorePassword=_password(stores), TrustAnchorCertificate=TRUST_ANCHOR,
    )["CustomKeyStoreId"]
    assert store_id.startswith("cks-")
    _state_everywhere(stores, store_id, "DISCONNECTED")
    entry = _describe(stores, 1, store_id)
    assert entry is not None and entry["CloudHsmClusterId"] == STORE_TOKEN
    assert entry["CustomKeyStoreType"] == "AWS_CLOUDHSM"
    assert entry["TrustAnchorCertificate"] == TRUST_ANCHOR and "ConnectionErrorCode" not in entry
    assert error_of(lambda: client.create_custom_key_store(
        CustomKeyStoreName="primary", CloudHsmClusterId=MISSING_TOKEN,
        KeyStorePassword="secret-1", TrustAnchorCertificate=TRUST_ANCHOR))[0] == \
        "CustomKeyStoreNameInUseException"
    assert error_of(lambda: client.create_custom_key_store(
        CustomKeyStoreName="other", CloudHsmClusterId=STORE_TOKEN,
        KeyStorePassword="secret-1", TrustAnchorCertificate=TRUST_ANCHOR))[0] == \
        "CloudHsmClusterInUseException"
    assert error_of(lambda: client.create_key(CustomKeyStoreId=store_id,
                                              Origin="AWS_CLOUDHSM"))[0] == \
        "CustomKeyStoreInvalidStateException"

    stores.client(1).connect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(stores, store_id, "CONNECTED")
    metadata = stores.client(2).create_key(CustomKeyStoreId=store_id,
                                           Origin="AWS_CLOUDHSM")["KeyMetadata"]
    assert metadata["Origin"] == "AWS_CLOUDHSM" and metadata["CustomKeyStoreId"] == store_id
    assert metadata["CloudHsmClusterId"] == STORE_TOKEN and metadata["KeyState"] == "Enabled"
    key_id = metadata["KeyId"]
    assert error_of(lambda: client.create_key(CustomKeyStoreId=store_id, Origin="AWS_CLOUDHSM",
                                              KeySpec="HMAC_256",
                                              KeyUsage="GENERATE_VERIFY_MAC"))[0] == \
        "UnsupportedOperationException"
    assert error_of(lambda: client.enable_key_rotation(KeyId=key_id))[0] == \
        "UnsupportedOperationException"
    blob = wait_for(lambda: client.encrypt(KeyId=key_id, Plaintext=b"in the store")[
        "CiphertextBlob"], 20, what="encrypt")
    for node in range(stores.size):
        assert wait_for(lambda n=node: _decrypt(stores, n, blob), 20,
                        what=f"decrypt on node {node}") == b"in the store"
    data_key = stores.client(1).generate_data_key(KeyId=key_id, KeySpec="AES_256")
    assert _decrypt(stores, 2, data_key["CiphertextBlob"]) == data_key["Plaintext"]
    assert len(stores.client(1).generate_random(NumberOfBytes=24,
                                                CustomKeyStoreId=store_id)["Plaintext"]) == 24

    # Disconnected: its keys are Unavailable on every node, and nothing may use them.
    stores.client(2).disconnect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(stores, store_id, "DISCONNECTED")
    arn = metadata["Arn"]
    for node in range(stores.size):
        node_client = stores.client(node)
        assert node_client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == \
            "Unavailable"
        assert error_of(lambda c=node_client: c.decrypt(CiphertextBlob=blob)) == \
            ("KMSInvalidStateException", f"{arn} is unavailable.")
        assert error_of(lambda c=node_client: c.encrypt(KeyId=key_id, Plaintext=b"x"))[0] == \
            "KMSInvalidStateException"
    assert error_of(lambda: client.generate_random(NumberOfBytes=8,
                                                   CustomKeyStoreId=store_id))[0] == \
        "CustomKeyStoreInvalidStateException"
    assert error_of(lambda: client.disconnect_custom_key_store(CustomKeyStoreId=store_id))[0] \
        == "CustomKeyStoreInvalidStateException"
    assert error_of(lambda: client.delete_custom_key_store(CustomKeyStoreId=store_id))[0] == \
        "CustomKeyStoreHasCMKsException"
    # AWS: only a cluster that shares the original's backup history, i.e. holds its keys.
    assert error_of(lambda: client.update_custom_key_store(
        CustomKeyStoreId=store_id, CloudHsmClusterId=UNRELATED_TOKEN,
        KeyStorePassword=stores.info["key_store_tokens"][UNRELATED_TOKEN]))[0] == \
        "CloudHsmClusterNotRelatedException"
    assert error_of(lambda: client.update_custom_key_store(
        CustomKeyStoreId=store_id, CloudHsmClusterId=MISSING_TOKEN))[0] == \
        "CloudHsmClusterNotFoundException"

    # A wrong password: the connection FAILS (the call itself succeeds, as at AWS).
    client.update_custom_key_store(CustomKeyStoreId=store_id, KeyStorePassword="not-the-pin",
                                   NewCustomKeyStoreName="renamed")
    client.connect_custom_key_store(CustomKeyStoreId=store_id)
    failed = _describe(stores, 0, store_id)
    assert failed is not None and failed["ConnectionState"] == "FAILED"
    assert failed["ConnectionErrorCode"] == "INVALID_CREDENTIALS"
    assert failed["CustomKeyStoreName"] == "renamed"
    assert error_of(lambda: client.connect_custom_key_store(CustomKeyStoreId=store_id))[0] == \
        "CustomKeyStoreInvalidStateException"
    client.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    client.update_custom_key_store(CustomKeyStoreId=store_id,
                                   KeyStorePassword=_password(stores))
    stores.client(2).connect_custom_key_store(CustomKeyStoreId=store_id)
    _state_everywhere(stores, store_id, "CONNECTED")
    # Only the name may change while connected.
    assert error_of(lambda: client.update_custom_key_store(
        CustomKeyStoreId=store_id, KeyStorePassword=_password(stores)))[0] == \
        "CustomKeyStoreInvalidStateException"
    for node in range(stores.size):
        assert wait_for(lambda n=node: _decrypt(stores, n, blob), 20,
                        what=f"decrypt after reconnecting on node {node}") == b"in the store"


def test_missing_token_fails_to_connect_and_store_can_be_deleted(stores: Cluster) -> None:
    client = stores.client(1)
    store_id = client.create_custom_key_store(
        CustomKeyStoreName="nowhere", CloudHsmClusterId=MISSING_TOKEN,
        KeyStorePassword="secret-1", TrustAnchorCertificate=TRUST_ANCHOR)["CustomKeyStoreId"]
    client.connect_custom_key_store(CustomKeyStoreId=store_id)
    entry = _describe(stores, 1, store_id)
    assert entry is not None and entry["ConnectionState"] == "FAILED"
    assert entry["ConnectionErrorCode"] == "CLUSTER_NOT_FOUND"
    assert error_of(lambda: client.delete_custom_key_store(CustomKeyStoreId=store_id))[0] == \
        "CustomKeyStoreInvalidStateException"
    client.disconnect_custom_key_store(CustomKeyStoreId=store_id)
    client.delete_custom_key_store(CustomKeyStoreId=store_id)
    for node in range(stores.size):
        wait_for(lambda n=node: _describe(stores, n, store_id) is None, 20,
                 what=f"deletion on node {node}")
    assert error_of(lambda: client.describe_custom_key_stores(
        CustomKeyStoreName="nowhere"))[0] == "CustomKeyStoreNotFoundException"


def test_key_store_password_is_never_stored_in_the_clear(stores: Cluster) -> None:
    password = _password(stores).encode()
    found = []
    for root, _dirs, files in os.walk(stores.data_dir):
        for name in files:
            if name.endswith(".pin"):
                continue  # the operator's PIN files for the tokens themselves
            with open(os.path.join(root, name), "rb") as handle:
                if password in handle.read():
                    found.append(os.path.join(root, name))
    assert not found
