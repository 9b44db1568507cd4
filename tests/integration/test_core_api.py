"""The core KMS API through boto3 against a real 3-node cluster."""

from __future__ import annotations

import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.integration.harness import Cluster, wait_for


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


def test_key_created_on_one_node_is_described_on_every_node(cluster: Cluster) -> None:
    created = cluster.client(1).create_key(Description="made on node 2")["KeyMetadata"]
    assert created["Arn"] == (f"arn:aws:kms:{cluster.region}:{cluster.info['account_id']}"
                              f":key/{created['KeyId']}")
    for node in (0, 2):
        described = cluster.client(node).describe_key(KeyId=created["KeyId"])["KeyMetadata"]
        assert described["KeyId"] == created["KeyId"]
        assert described["Description"] == "made on node 2"
        assert described["KeyState"] == "Enabled"
        assert described["Enabled"] is True
        assert described["KeySpec"] == "SYMMETRIC_DEFAULT"
        assert described["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]


def test_encrypt_on_one_node_decrypt_on_another(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    plaintext = b"envelope " + uuid.uuid4().bytes
    cluster.secrets_seen.append(plaintext)
    context = {"tenant": "acme", "purpose": "test"}
    encrypted = cluster.client(0).encrypt(KeyId=key["KeyId"], Plaintext=plaintext,
                                          EncryptionContext=context)
    assert encrypted["KeyId"] == key["Arn"]
    assert encrypted["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert plaintext not in encrypted["CiphertextBlob"]
    decrypted = cluster.client(2).decrypt(CiphertextBlob=encrypted["CiphertextBlob"],
                                          EncryptionContext=context)
    assert decrypted["Plaintext"] == plaintext
    assert decrypted["KeyId"] == key["Arn"]
    # The encryption context must match exactly and case-sensitively.
    for wrong in ({"tenant": "ACME", "purpose": "test"}, {"tenant": "acme"}, {}):
        with pytest.raises(ClientError) as excinfo:
            cluster.client(1).decrypt(CiphertextBlob=encrypted["CiphertextBlob"],
                                      EncryptionContext=wrong)
        assert error_code(excinfo) == "InvalidCiphertextException"


def test_tampered_ciphertext_is_invalid(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    blob = cluster.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"x" * 40)["CiphertextBlob"]
    for position in (0, 1, 25, 30, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[position] ^= 0x01
        with pytest.raises(ClientError) as excinfo:
            cluster.client(1).decrypt(CiphertextBlob=bytes(tampered))
        assert error_code(excinfo) in ("InvalidCiphertextException", "NotFoundException")
    with pytest.raises(ClientError) as excinfo:
        cluster.client(1).decrypt(CiphertextBlob=b"not a kmsd ciphertext at all, clearly")
    assert error_code(excinfo) == "InvalidCiphertextException"


def test_decrypt_with_the_wrong_key_id_is_incorrect_key(cluster: Cluster) -> None:
    first = cluster.client(0).create_key()["KeyMetadata"]
    second = cluster.client(0).create_key()["KeyMetadata"]
    blob = cluster.client(0).encrypt(KeyId=first["KeyId"], Plaintext=b"p")["CiphertextBlob"]
    with pytest.raises(ClientError) as excinfo:
        cluster.client(1).decrypt(CiphertextBlob=blob, KeyId=second["KeyId"])
    assert error_code(excinfo) == "IncorrectKeyException"
    assert cluster.client(1).decrypt(CiphertextBlob=blob, KeyId=first["Arn"])["Plaintext"] == b"p"


def test_generate_data_key_variants(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    for spec, length in (("AES_256", 32), ("AES_128", 16)):
        data_key = cluster.client(1).generate_data_key(KeyId=key["KeyId"], KeySpec=spec)
        cluster.secrets_seen.append(data_key["Plaintext"])
        assert len(data_key["Plaintext"]) == length
        assert data_key["KeyId"] == key["Arn"]
        again = cluster.client(2).decrypt(CiphertextBlob=data_key["CiphertextBlob"])
        assert again["Plaintext"] == data_key["Plaintext"]
    by_bytes = cluster.client(0).generate_data_key(KeyId=key["KeyId"], NumberOfBytes=64)
    cluster.secrets_seen.append(by_bytes["Plaintext"])
    assert len(by_bytes["Plaintext"]) == 64
    without = cluster.client(2).generate_data_key_without_plaintext(
        KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext={"k": "v"})
    assert "Plaintext" not in without
    recovered = cluster.client(0).decrypt(CiphertextBlob=without["CiphertextBlob"],
                                          EncryptionContext={"k": "v"})
    cluster.secrets_seen.append(recovered["Plaintext"])
    assert len(recovered["Plaintext"]) == 32
    # AWS: "Please specify either number of bytes or key spec." (both, or neither)
    with pytest.raises(ClientError) as excinfo:
        cluster.client(0).generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256",
                                            NumberOfBytes=32)
    assert error_code(excinfo) == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        cluster.client(0).generate_data_key(KeyId=key["KeyId"])
    assert error_code(excinfo) == "ValidationException"


def test_generate_random(cluster: Cluster) -> None:
    first = cluster.client(0).generate_random(NumberOfBytes=32)["Plaintext"]
    second = cluster.client(1).generate_random(NumberOfBytes=32)["Plaintext"]
    assert len(first) == len(second) == 32
    assert first != second


def test_key_id_forms(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    alias = f"alias/forms-{uuid.uuid4().hex[:8]}"
    cluster.client(0).create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    alias_arn = f"arn:aws:kms:{cluster.region}:{cluster.info['account_id']}:{alias}"
    for identifier in (key["KeyId"], key["Arn"], alias, alias_arn):
        described = cluster.client(1).describe_key(KeyId=identifier)["KeyMetadata"]
        assert described["KeyId"] == key["KeyId"]
        blob = cluster.client(2).encrypt(KeyId=identifier, Plaintext=b"f")["CiphertextBlob"]
        assert cluster.client(0).decrypt(CiphertextBlob=blob)["Plaintext"] == b"f"
    for missing in (str(uuid.uuid4()), "alias/does-not-exist", "not-a-key-id",
                    f"arn:aws:kms:eu-west-1:{cluster.info['account_id']}:key/{key['KeyId']}"):
        with pytest.raises(ClientError) as excinfo:
            cluster.client(0).describe_key(KeyId=missing)
        assert error_code(excinfo) == "NotFoundException"


def test_aliases_lifecycle(cluster: Cluster) -> None:
    first = cluster.client(0).create_key()["KeyMetadata"]
    second = cluster.client(0).create_key()["KeyMetadata"]
    alias = f"alias/life-{uuid.uuid4().hex[:8]}"
    cluster.client(1).create_alias(AliasName=alias, TargetKeyId=first["KeyId"])
    with pytest.raises(ClientError) as excinfo:
        cluster.client(2).create_alias(AliasName=alias, TargetKeyId=second["KeyId"])
    assert error_code(excinfo) == "AlreadyExistsException"
    listed = cluster.client(2).list_aliases(KeyId=first["KeyId"])["Aliases"]
    assert [a["AliasName"] for a in listed] == [alias]
    assert listed[0]["TargetKeyId"] == first["KeyId"]
    cluster.client(2).update_alias(AliasName=alias, TargetKeyId=second["Arn"])
    wait_for(lambda: cluster.client(0).describe_key(KeyId=alias)["KeyMetadata"]["KeyId"]
             == second["KeyId"], 5, what="alias update on node 1")
    cluster.client(0).delete_alias(AliasName=alias)
    with pytest.raises(ClientError) as excinfo:
        cluster.client(1).delete_alias(AliasName=alias)
    assert error_code(excinfo) == "NotFoundException"
    with pytest.raises(ClientError) as excinfo:
        cluster.client(1).create_alias(AliasName="alias/aws/reserved", TargetKeyId=first["KeyId"])
    assert error_code(excinfo) == "InvalidAliasNameException"


def test_list_keys_paginates(cluster: Cluster) -> None:
    created = {cluster.client(0).create_key()["KeyMetadata"]["KeyId"] for _ in range(5)}
    seen: list[str] = []
    marker = None
    while True:
        kwargs = {"Limit": 2, **({"Marker": marker} if marker else {})}
        page = cluster.client(1).list_keys(**kwargs)
        assert len(page["Keys"]) <= 2
        seen.extend(k["KeyId"] for k in page["Keys"])
        if not page["Truncated"]:
            assert "NextMarker" not in page
            break
        marker = page["NextMarker"]
    assert len(seen) == len(set(seen))
    assert created <= set(seen)
    with pytest.raises(ClientError) as excinfo:
        cluster.client(1).list_keys(Marker="bogus-marker")
    assert error_code(excinfo) == "InvalidMarkerException"


def test_disabled_key_refuses_crypto_on_every_node(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    blob = cluster.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"before")["CiphertextBlob"]
    cluster.client(1).disable_key(KeyId=key["KeyId"])
    for node in range(cluster.size):
        client = cluster.client(node)
        wait_for(lambda c=client: c.describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"]
                 == "Disabled", 5, what="disabled state")
        for call in (lambda c=client: c.encrypt(KeyId=key["KeyId"], Plaintext=b"x"),
                     lambda c=client: c.decrypt(CiphertextBlob=blob),
                     lambda c=client: c.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256")):
            with pytest.raises(ClientError) as excinfo:
                call()
            assert error_code(excinfo) == "DisabledException"
            assert excinfo.value.response["Error"]["Message"] == f"{key['Arn']} is disabled."
    cluster.client(2).enable_key(KeyId=key["KeyId"])
    wait_for(lambda: cluster.client(0).decrypt(CiphertextBlob=blob)["Plaintext"] == b"before",
             5, what="re-enabled key")


def test_validation_errors_follow_the_model(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    # boto3 validates client-side; turn that off to see the server's answer.
    unchecked = boto3.client(
        "kms", endpoint_url=cluster.info["endpoints"][0], region_name=cluster.region,
        aws_access_key_id=cluster.info["access_key_id"],
        aws_secret_access_key=cluster.info["secret_access_key"],
        config=Config(parameter_validation=False, retries={"max_attempts": 1}))
    with pytest.raises(ClientError) as excinfo:
        unchecked.encrypt(KeyId=key["KeyId"], Plaintext=b"x" * 4097)
    assert error_code(excinfo) == "ValidationException"
    message = excinfo.value.response["Error"]["Message"]
    assert "plaintext" in message and "4096" in message
    assert "xxxx" not in message
    with pytest.raises(ClientError) as excinfo:
        unchecked.create_key(KeySpec="NOT_A_SPEC")
    assert error_code(excinfo) == "ValidationException"
    with pytest.raises(ClientError) as excinfo:
        unchecked.list_keys(Limit=0)
    assert error_code(excinfo) == "ValidationException"


def test_unsupported_operations_say_so(cluster: Cluster) -> None:
    with pytest.raises(ClientError) as excinfo:
        cluster.client(0).create_key(KeySpec="ECC_NIST_EDWARDS25519", KeyUsage="SIGN_VERIFY")
    assert error_code(excinfo) == "UnsupportedOperationException"


def test_regions_are_separate(tmp_path_factory: pytest.TempPathFactory) -> None:
    from tests.integration.harness import start_cluster

    multi = start_cluster(str(tmp_path_factory.mktemp("regions")), nodes=1,
                          extra_args=("--region", "us-east-1,eu-west-1"))
    try:
        east = multi.client(0, region="us-east-1")
        west = multi.client(0, region="eu-west-1")
        key = east.create_key()["KeyMetadata"]
        assert key["Arn"].startswith("arn:aws:kms:us-east-1:")
        west_key = west.create_key()["KeyMetadata"]
        assert west_key["Arn"].startswith("arn:aws:kms:eu-west-1:")
        with pytest.raises(ClientError) as excinfo:
            west.describe_key(KeyId=key["KeyId"])
        assert error_code(excinfo) == "NotFoundException"
        blob = east.encrypt(KeyId=key["KeyId"], Plaintext=b"east")["CiphertextBlob"]
        with pytest.raises(ClientError) as excinfo:
            west.decrypt(CiphertextBlob=blob)
        assert error_code(excinfo) == "NotFoundException"
        assert {k["KeyId"] for k in west.list_keys()["Keys"]} == {west_key["KeyId"]}
        # A region the cluster does not serve is refused as AWS refuses a wrong scope.
        with pytest.raises(ClientError) as excinfo:
            multi.client(0, region="ap-south-1", retries=1).list_keys()
        assert error_code(excinfo) == "InvalidSignatureException"
        assert "valid region" in excinfo.value.response["Error"]["Message"]
    finally:
        multi.stop()
