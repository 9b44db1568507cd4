"""Imported key material (Origin EXTERNAL) on a real three-node cluster with test clocks.

Material is wrapped locally with `cryptography`, the way AWS's "Importing key material"
guide has customers do it with openssl. Offsets of the test clock only grow: later tests
see the time earlier tests moved to.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tests.integration.harness import (
    DAY,
    Cluster,
    advance_clock,
    error_of,
    start_cluster,
    stored_views,
    wait_for,
)

ALGORITHMS = ("RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256", "RSA_AES_KEY_WRAP_SHA_1",
              "RSA_AES_KEY_WRAP_SHA_256")


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(str(tmp_path_factory.mktemp("import")),
                            extra_args=("--test-clock", "--scheduler-interval", "0.3"))
    running.info["offset"] = 0.0
    running.info["materials"] = []
    yield running
    running.stop()


def wrap(public_key_der: bytes, algorithm: str, material: bytes) -> bytes:
    h = hashes.SHA1 if algorithm.endswith("SHA_1") else hashes.SHA256
    oaep = padding.OAEP(padding.MGF1(h()), h(), None)
    public_key = load_der_public_key(public_key_der)
    if algorithm.startswith("RSAES_OAEP"):
        return public_key.encrypt(material, oaep)
    ephemeral = os.urandom(32)
    return public_key.encrypt(ephemeral, oaep) + aes_key_wrap_with_padding(ephemeral, material)


def external_key(cluster: Cluster) -> dict[str, Any]:
    return cluster.client(0).create_key(Origin="EXTERNAL")["KeyMetadata"]


def import_material(cluster: Cluster, key_id: str, material: bytes,
                    algorithm: str = "RSAES_OAEP_SHA_1", spec: str = "RSA_2048",
                    node: int = 0, **extra: Any) -> dict[str, Any]:
    client = cluster.client(node)
    params = client.get_parameters_for_import(KeyId=key_id, WrappingAlgorithm=algorithm,
                                              WrappingKeySpec=spec)
    cluster.info["materials"].append(material)
    return client.import_key_material(
        KeyId=key_id, ImportToken=params["ImportToken"],
        EncryptedKeyMaterial=wrap(params["PublicKey"], algorithm, material),
        **({"ExpirationModel": "KEY_MATERIAL_DOES_NOT_EXPIRE"} | extra))


def test_external_key_is_pending_import(timed: Cluster) -> None:
    key = external_key(timed)
    assert key["Origin"] == "EXTERNAL" and key["KeyState"] == "PendingImport"
    assert not key["Enabled"] and "CurrentKeyMaterialId" not in key
    arn = key["Arn"]
    client = timed.client(1)
    wait_for(lambda: client.describe_key(KeyId=key["KeyId"]) is not None, 20)
    # Key state table footnote [5]: "<arn> is pending import."
    assert error_of(lambda: client.encrypt(KeyId=key["KeyId"], Plaintext=b"x")) == \
        ("KMSInvalidStateException", f"{arn} is pending import.")
    assert error_of(lambda: client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256"))[0] \
        == "KMSInvalidStateException"
    for call in (client.enable_key, client.disable_key):
        assert error_of(lambda c=call: c(KeyId=key["KeyId"]))[0] == "KMSInvalidStateException"
    assert error_of(lambda: client.enable_key_rotation(KeyId=key["KeyId"]))[0] == \
        "UnsupportedOperationException"
    # AWS: "As of October 10, 2023, KMS does not support the RSAES_PKCS1_V1_5 wrapping
    # algorithm" -- for any key spec, on any token.
    code, message = error_of(lambda: client.get_parameters_for_import(
        KeyId=key["KeyId"], WrappingAlgorithm="RSAES_PKCS1_V1_5", WrappingKeySpec="RSA_4096"))
    assert code == "UnsupportedOperationException" and "October 10, 2023" in message
    normal = timed.client(0).create_key()["KeyMetadata"]
    assert error_of(lambda: client.get_parameters_for_import(
        KeyId=normal["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_1",
        WrappingKeySpec="RSA_2048"))[0] == "UnsupportedOperationException"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_import_with_each_wrapping_algorithm(timed: Cluster, algorithm: str) -> None:
    key = external_key(timed)
    material = os.urandom(32)
    import_material(timed, key["KeyId"], material, algorithm)
    described = timed.client(0).describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert described["KeyState"] == "Enabled" and described["Origin"] == "EXTERNAL"
    assert described["ExpirationModel"] == "KEY_MATERIAL_DOES_NOT_EXPIRE"
    blob = timed.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"byok")["CiphertextBlob"]
    for node in range(timed.size):
        plaintext = wait_for(lambda n=node: _decrypt_or_none(timed, n, blob), 20,
                             what=f"decrypt on node {node}")
        assert plaintext == b"byok"


def _decrypt_or_none(cluster: Cluster, node: int, blob: bytes) -> bytes | None:
    try:
        return cluster.client(node).decrypt(CiphertextBlob=blob)["Plaintext"]
    except ClientError:
        return None


def test_large_wrapping_key(timed: Cluster) -> None:
    key = external_key(timed)
    import_material(timed, key["KeyId"], os.urandom(32), "RSA_AES_KEY_WRAP_SHA_256",
                    spec="RSA_4096", node=1)
    assert timed.client(1).describe_key(KeyId=key["KeyId"])["KeyMetadata"]["Enabled"]


def test_delete_reimport_same_material_and_refuse_other(timed: Cluster) -> None:
    key = external_key(timed)
    material = os.urandom(32)
    import_material(timed, key["KeyId"], material)
    blob = timed.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"before",
                                   EncryptionContext={"a": "b"})["CiphertextBlob"]
    timed.client(1).delete_imported_key_material(KeyId=key["KeyId"])
    described = timed.client(1).describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert described["KeyState"] == "PendingImport"
    assert error_of(lambda: timed.client(1).decrypt(
        CiphertextBlob=blob, EncryptionContext={"a": "b"}))[0] == "KMSInvalidStateException"
    # Different material: IncorrectKeyMaterialException, and the key stays PendingImport.
    assert error_of(lambda: import_material(timed, key["KeyId"], os.urandom(32),
                                           "RSA_AES_KEY_WRAP_SHA_1"))[0] == \
        "IncorrectKeyMaterialException"
    assert timed.client(0).describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == \
        "PendingImport"
    import_material(timed, key["KeyId"], material, "RSAES_OAEP_SHA_256", node=2)
    for node in range(timed.size):
        plaintext = wait_for(lambda n=node: _decrypt_ctx(timed, n, blob), 20,
                             what=f"decrypt after re-import on node {node}")
        assert plaintext == b"before"


def _decrypt_ctx(cluster: Cluster, node: int, blob: bytes) -> bytes | None:
    try:
        return cluster.client(node).decrypt(CiphertextBlob=blob,
                                            EncryptionContext={"a": "b"})["Plaintext"]
    except ClientError:
        return None


def test_invalid_import_tokens(timed: Cluster) -> None:
    key, other = external_key(timed), external_key(timed)
    client = timed.client(0)
    params = client.get_parameters_for_import(KeyId=key["KeyId"],
                                              WrappingAlgorithm="RSAES_OAEP_SHA_1",
                                              WrappingKeySpec="RSA_2048")
    valid_to = params["ParametersValidTo"].timestamp() - time.time() - timed.info["offset"]
    assert 0.99 * DAY < valid_to <= DAY
    encrypted = wrap(params["PublicKey"], "RSAES_OAEP_SHA_1", os.urandom(32))
    client.get_parameters_for_import(KeyId=other["KeyId"], WrappingAlgorithm="RSAES_OAEP_SHA_1",
                                     WrappingKeySpec="RSA_2048")
    for token in (b"garbage", params["ImportToken"][:-1] + b"\x00"):
        assert error_of(lambda t=token: client.import_key_material(
            KeyId=key["KeyId"], ImportToken=t, EncryptedKeyMaterial=encrypted,
            ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE"))[0] == "InvalidImportTokenException"
    # Bound to its key: the same token for another key is invalid.
    assert error_of(lambda: client.import_key_material(
        KeyId=other["KeyId"], ImportToken=params["ImportToken"], EncryptedKeyMaterial=encrypted,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE"))[0] == "InvalidImportTokenException"
    # Garbage material under a valid token: one opaque answer.
    assert error_of(lambda: client.import_key_material(
        KeyId=key["KeyId"], ImportToken=params["ImportToken"], EncryptedKeyMaterial=os.urandom(256),
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE"))[0] == "InvalidCiphertextException"
    advance_clock(timed, 1.01)
    assert error_of(lambda: client.import_key_material(
        KeyId=key["KeyId"], ImportToken=params["ImportToken"], EncryptedKeyMaterial=encrypted,
        ExpirationModel="KEY_MATERIAL_DOES_NOT_EXPIRE"))[0] == "ExpiredImportTokenException"


def test_material_expires_cluster_wide(timed: Cluster) -> None:
    key = external_key(timed)
    material = os.urandom(32)
    valid_to = datetime.datetime.fromtimestamp(time.time() + timed.info["offset"] + 2 * DAY,
                                               tz=datetime.UTC)
    import_material(timed, key["KeyId"], material, ExpirationModel="KEY_MATERIAL_EXPIRES",
                    ValidTo=valid_to)
    described = timed.client(0).describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert described["ExpirationModel"] == "KEY_MATERIAL_EXPIRES"
    assert abs(described["ValidTo"].timestamp() - valid_to.timestamp()) < 1
    blob = timed.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"short-lived")["CiphertextBlob"]
    advance_clock(timed, 1)
    time.sleep(1)
    assert timed.client(0).describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == \
        "Enabled"
    advance_clock(timed, 1.01)
    for node in range(timed.size):
        wait_for(lambda n=node: timed.client(n).describe_key(
            KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == "PendingImport", 30,
            what=f"expiry on node {node}")
        assert error_of(lambda n=node: timed.client(n).decrypt(CiphertextBlob=blob))[0] == \
            "KMSInvalidStateException"
    import_material(timed, key["KeyId"], material)
    assert timed.client(1).decrypt(CiphertextBlob=blob)["Plaintext"] == b"short-lived"


def test_imported_material_never_stored(timed: Cluster) -> None:
    materials = timed.info["materials"]
    assert materials, "run after the import tests"
    found = []
    for root, _dirs, files in os.walk(timed.data_dir):
        for name in files:
            path = os.path.join(root, name)
            try:
                views = stored_views(path)
            except OSError:
                continue
            if any(m in view for view in views for m in materials):
                found.append(path)
    assert not found
