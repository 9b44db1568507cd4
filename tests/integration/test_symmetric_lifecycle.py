"""Symmetric keys, complete: re-encryption, tags, deletion, rotation, the key state table.

One cluster with test clocks: the tests move every node's proposer clock
forward to reach deletion dates and rotation periods. Offsets only grow, so
later tests see the time earlier tests moved to.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.harness import (
    Cluster,
    advance_clock,
    error_of,
    start_cluster,
    stored_views,
    wait_for,
)


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(str(tmp_path_factory.mktemp("timed")),
                            extra_args=("--test-clock", "--scheduler-interval", "0.3"))
    running.info["offset"] = 0.0
    yield running
    running.stop()


def code_or_none(call: Callable[[], Any]) -> str | None:
    """The error code of a call, or None if it succeeded (usable inside wait_for)."""
    try:
        call()
    except ClientError as error:
        return error.response["Error"]["Code"]
    return None


def test_re_encrypt_between_keys_and_contexts(timed: Cluster) -> None:
    source = timed.client(0).create_key()["KeyMetadata"]
    destination = timed.client(0).create_key()["KeyMetadata"]
    blob = timed.client(0).encrypt(KeyId=source["KeyId"], Plaintext=b"move me",
                                   EncryptionContext={"from": "a"})["CiphertextBlob"]
    moved = timed.client(1).re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext={"from": "a"},
        DestinationKeyId=destination["KeyId"], DestinationEncryptionContext={"to": "b"})
    assert moved["SourceKeyId"] == source["Arn"] and moved["KeyId"] == destination["Arn"]
    assert moved["SourceEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    assert moved["DestinationEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    out = timed.client(2).decrypt(CiphertextBlob=moved["CiphertextBlob"],
                                  EncryptionContext={"to": "b"})
    assert out["Plaintext"] == b"move me" and out["KeyId"] == destination["Arn"]
    # The source context must match; the source key id, when given, must be the right key.
    assert error_of(lambda: timed.client(1).re_encrypt(
        CiphertextBlob=blob, DestinationKeyId=destination["KeyId"]))[0] == \
        "InvalidCiphertextException"
    assert error_of(lambda: timed.client(1).re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext={"from": "a"},
        SourceKeyId=destination["KeyId"], DestinationKeyId=source["KeyId"]))[0] == \
        "IncorrectKeyException"


def test_dry_run_checks_everything_and_does_nothing(timed: Cluster) -> None:
    key = timed.client(0).create_key()["KeyMetadata"]
    client = timed.client(1)
    blob = client.encrypt(KeyId=key["KeyId"], Plaintext=b"dry")["CiphertextBlob"]
    for call in (lambda: client.encrypt(KeyId=key["KeyId"], Plaintext=b"x", DryRun=True),
                 lambda: client.decrypt(CiphertextBlob=blob, DryRun=True),
                 lambda: client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256",
                                                  DryRun=True),
                 lambda: client.generate_data_key_without_plaintext(
                     KeyId=key["KeyId"], NumberOfBytes=16, DryRun=True),
                 lambda: client.re_encrypt(CiphertextBlob=blob, DestinationKeyId=key["KeyId"],
                                           DryRun=True)):
        assert error_of(call) == ("DryRunOperationException",
                                 "The request would have succeeded, but the DryRun option is set.")
    # A dry run that would fail answers the failure, not DryRunOperationException.
    client.disable_key(KeyId=key["KeyId"])
    assert error_of(lambda: client.encrypt(KeyId=key["KeyId"], Plaintext=b"x",
                                          DryRun=True))[0] == "DisabledException"


def test_update_description_and_key_policies(timed: Cluster) -> None:
    key = timed.client(0).create_key(Description="old")["KeyMetadata"]
    timed.client(1).update_key_description(KeyId=key["Arn"], Description="new")
    wait_for(lambda: timed.client(2).describe_key(KeyId=key["KeyId"])["KeyMetadata"]
             ["Description"] == "new", 5, what="new description")
    assert timed.client(0).list_key_policies(KeyId=key["KeyId"])["PolicyNames"] == ["default"]
    policy = timed.client(0).get_key_policy(KeyId=key["KeyId"], PolicyName="default")
    assert f"arn:aws:iam::{timed.info['account_id']}:root" in policy["Policy"]


def test_tags(timed: Cluster) -> None:
    key = timed.client(0).create_key(Tags=[{"TagKey": "team", "TagValue": "red"}])["KeyMetadata"]
    client = timed.client(1)
    client.tag_resource(KeyId=key["KeyId"], Tags=[{"TagKey": "team", "TagValue": "blue"},
                                                 {"TagKey": "env", "TagValue": "prod"}])
    wait_for(lambda: {t["TagKey"]: t["TagValue"] for t in
                      timed.client(2).list_resource_tags(KeyId=key["KeyId"])["Tags"]}
             == {"team": "blue", "env": "prod"}, 5, what="tags on node 3")
    client.untag_resource(KeyId=key["KeyId"], TagKeys=["env"])
    assert [t["TagKey"] for t in client.list_resource_tags(KeyId=key["KeyId"])["Tags"]] == ["team"]
    assert error_of(lambda: client.tag_resource(
        KeyId=key["KeyId"], Tags=[{"TagKey": "aws:reserved", "TagValue": "x"}]))[0] == \
        "TagException"
    many = [{"TagKey": f"k{i:02d}", "TagValue": str(i)} for i in range(49)]
    client.tag_resource(KeyId=key["KeyId"], Tags=many)
    assert error_of(lambda: client.tag_resource(
        KeyId=key["KeyId"], Tags=[{"TagKey": "one-too-many", "TagValue": "x"}]))[0] == \
        "LimitExceededException"
    seen, marker = [], None
    while True:
        page = client.list_resource_tags(KeyId=key["KeyId"], Limit=7,
                                         **({"Marker": marker} if marker else {}))
        seen += [t["TagKey"] for t in page["Tags"]]
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    assert sorted(seen) == sorted([*(t["TagKey"] for t in many), "team"])


def test_key_state_table_for_a_disabled_key(timed: Cluster) -> None:
    key = timed.client(0).create_key()["KeyMetadata"]
    client = timed.client(0)
    client.disable_key(KeyId=key["KeyId"])
    message = f"{key['Arn']} is disabled."
    # [1] DisabledException: <ARN> is disabled. (key-state table)
    for call in (lambda: client.enable_key_rotation(KeyId=key["KeyId"]),
                 lambda: client.rotate_key_on_demand(KeyId=key["KeyId"]),
                 lambda: client.encrypt(KeyId=key["KeyId"], Plaintext=b"x"),
                 lambda: client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_128")):
        assert error_of(call) == ("DisabledException", message)
    # Management calls still work on a disabled key.
    client.tag_resource(KeyId=key["KeyId"], Tags=[{"TagKey": "a", "TagValue": "b"}])
    client.update_key_description(KeyId=key["KeyId"], Description="still manageable")
    client.create_alias(AliasName=f"alias/disabled-{uuid.uuid4().hex[:6]}",
                        TargetKeyId=key["KeyId"])
    assert client.get_key_rotation_status(KeyId=key["KeyId"])["KeyRotationEnabled"] is False


def test_schedule_and_cancel_deletion(timed: Cluster) -> None:
    key = timed.client(0).create_key()["KeyMetadata"]
    blob = timed.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"p")["CiphertextBlob"]
    scheduled = timed.client(1).schedule_key_deletion(KeyId=key["KeyId"])
    assert scheduled["KeyId"] == key["Arn"]
    assert scheduled["KeyState"] == "PendingDeletion"
    assert scheduled["PendingWindowInDays"] == 30  # AWS's default window
    described = timed.client(2).describe_key(KeyId=key["KeyId"])["KeyMetadata"]
    assert described["KeyState"] == "PendingDeletion" and described["Enabled"] is False
    assert described["PendingDeletionWindowInDays"] == 30
    assert described["DeletionDate"] == scheduled["DeletionDate"]
    pending = f"{key['Arn']} is pending deletion."
    client = timed.client(2)
    # [3] KMSInvalidStateException: <ARN> is pending deletion.
    for call in (lambda: client.encrypt(KeyId=key["KeyId"], Plaintext=b"x"),
                 lambda: client.decrypt(CiphertextBlob=blob),
                 lambda: client.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256"),
                 lambda: client.enable_key(KeyId=key["KeyId"]),
                 lambda: client.disable_key(KeyId=key["KeyId"]),
                 lambda: client.update_key_description(KeyId=key["KeyId"], Description="x"),
                 lambda: client.tag_resource(KeyId=key["KeyId"],
                                             Tags=[{"TagKey": "a", "TagValue": "b"}]),
                 lambda: client.untag_resource(KeyId=key["KeyId"], TagKeys=["a"]),
                 lambda: client.enable_key_rotation(KeyId=key["KeyId"]),
                 lambda: client.schedule_key_deletion(KeyId=key["KeyId"]),
                 lambda: client.create_alias(AliasName="alias/to-pending",
                                             TargetKeyId=key["KeyId"])):
        assert error_of(call) == ("KMSInvalidStateException", pending)
    assert client.list_resource_tags(KeyId=key["KeyId"])["Tags"] == []
    assert client.get_key_policy(KeyId=key["KeyId"], PolicyName="default")["Policy"]
    cancelled = timed.client(0).cancel_key_deletion(KeyId=key["KeyId"])
    assert cancelled["KeyId"] == key["Arn"]
    wait_for(lambda: timed.client(1).describe_key(KeyId=key["KeyId"])["KeyMetadata"]
             ["KeyState"] == "Disabled", 5, what="cancelled deletion leaves the key Disabled")
    # [4] KMSInvalidStateException: <ARN> is not pending deletion.
    assert error_of(lambda: timed.client(1).cancel_key_deletion(KeyId=key["KeyId"])) == (
        "KMSInvalidStateException", f"{key['Arn']} is not pending deletion.")
    for window in (6, 31):
        assert error_of(lambda w=window: timed.client(0).schedule_key_deletion(
            KeyId=key["KeyId"], PendingWindowInDays=w))[0] == "ValidationException"


def test_rotate_three_times_every_version_decrypts_on_every_node(timed: Cluster) -> None:
    key = timed.client(0).create_key()["KeyMetadata"]
    blobs: list[tuple[bytes, bytes, str]] = []
    for version in range(4):
        if version:
            assert timed.client(version % 3).rotate_key_on_demand(KeyId=key["KeyId"])["KeyId"] \
                == key["Arn"]
        current = wait_for(lambda: _current_material(timed, key["KeyId"]), 5)
        plaintext = f"version {version}".encode()
        blob = timed.client(0).encrypt(KeyId=key["KeyId"], Plaintext=plaintext)["CiphertextBlob"]
        blobs.append((blob, plaintext, current))
    assert len({material for _, _, material in blobs}) == 4
    for node in range(timed.size):
        for blob, plaintext, material in blobs:
            out = wait_for(lambda n=node, b=blob: timed.client(n).decrypt(CiphertextBlob=b), 5)
            assert out["Plaintext"] == plaintext
            assert out["KeyMaterialId"] == material
    rotations = timed.client(1).list_key_rotations(KeyId=key["KeyId"])["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"] * 3
    assert [r["KeyMaterialId"] for r in rotations] == [m for _, _, m in blobs[1:]]
    assert rotations[-1]["KeyMaterialState"] == "CURRENT"
    everything = timed.client(1).list_key_rotations(KeyId=key["KeyId"],
                                                     IncludeKeyMaterial="ALL_KEY_MATERIAL")
    assert len(everything["Rotations"]) == 4
    paged = timed.client(1).list_key_rotations(KeyId=key["KeyId"], Limit=2)
    assert paged["Truncated"] and len(paged["Rotations"]) == 2


def _current_material(cluster: Cluster, key_id: str) -> str:
    return cluster.client(0).describe_key(KeyId=key_id)["KeyMetadata"]["CurrentKeyMaterialId"]


def test_on_demand_rotation_limit(timed: Cluster) -> None:
    key = timed.client(0).create_key()["KeyMetadata"]
    for _ in range(10):
        timed.client(0).rotate_key_on_demand(KeyId=key["KeyId"])
    assert error_of(lambda: timed.client(0).rotate_key_on_demand(KeyId=key["KeyId"]))[0] == \
        "LimitExceededException"


def _material_windows(path: str, length: int) -> Iterator[bytes]:
    for content in stored_views(path):
        for start in range(len(content) - length + 1):
            yield content[start:start + length]


def _files_holding(cluster: Cluster, material_ids: set[str]) -> list[str]:
    """Files under the data dirs that hold a wrapped key (40 bytes) with one of these ids."""
    found = []
    for directory, _, names in os.walk(cluster.data_dir):
        for name in names:
            path = os.path.join(directory, name)
            if "tokens" in path or name.endswith(".log"):
                continue
            if any(hashlib.sha256(w).hexdigest() in material_ids
                   for w in _material_windows(path, 40)):
                found.append(path)
    return found


def test_deletion_after_the_window_destroys_the_material_everywhere(timed: Cluster) -> None:
    key = timed.client(0).create_key()["KeyMetadata"]
    timed.client(0).rotate_key_on_demand(KeyId=key["KeyId"])
    alias = f"alias/doomed-{uuid.uuid4().hex[:6]}"
    timed.client(0).create_alias(AliasName=alias, TargetKeyId=key["KeyId"])
    blob = timed.client(1).encrypt(KeyId=alias, Plaintext=b"gone soon")["CiphertextBlob"]
    materials = {r["KeyMaterialId"] for r in timed.client(0).list_key_rotations(
        KeyId=key["KeyId"], IncludeKeyMaterial="ALL_KEY_MATERIAL")["Rotations"]}
    assert len(materials) == 2
    assert _files_holding(timed, materials), "the test cannot see the wrapped material at all"
    timed.client(2).schedule_key_deletion(KeyId=key["KeyId"], PendingWindowInDays=7)
    advance_clock(timed, 6)
    # Not yet: the window has a day to run.
    assert timed.client(0).describe_key(KeyId=key["KeyId"])["KeyMetadata"]["KeyState"] == \
        "PendingDeletion"
    advance_clock(timed, 1.01)
    for node in range(timed.size):
        wait_for(lambda n=node: code_or_none(lambda: timed.client(n).describe_key(
            KeyId=key["KeyId"])) == "NotFoundException", 20, what=f"deletion on node {node}")
        assert error_of(lambda n=node: timed.client(n).decrypt(CiphertextBlob=blob))[0] == \
            "NotFoundException"
        assert error_of(lambda n=node: timed.client(n).describe_key(KeyId=alias))[0] == \
            "NotFoundException"
    wait_for(lambda: not _files_holding(timed, materials), 30, interval=1,
             what="the deleted key's wrapped material to leave every data dir")


def test_automatic_rotation_survives_a_leader_change(timed: Cluster) -> None:
    key = timed.client(0).create_key()["KeyMetadata"]
    blob = timed.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"old")["CiphertextBlob"]
    timed.client(0).enable_key_rotation(KeyId=key["KeyId"], RotationPeriodInDays=90)
    status = wait_for(lambda: (s := timed.client(1).get_key_rotation_status(KeyId=key["KeyId"]))
                      ["KeyRotationEnabled"] and s, 5)
    assert status["RotationPeriodInDays"] == 90 and status["KeyId"] == key["Arn"]
    first_due = status["NextRotationDate"]
    leader = wait_for(lambda: timed.leader(), 10, what="a leader")
    timed.kill(leader)
    survivors = [n for n in range(timed.size) if n != leader]
    wait_for(lambda: timed.leader(among=survivors), 30, what="a new leader")
    advance_clock(timed, 91)
    rotations = wait_for(lambda: timed.client(survivors[0]).list_key_rotations(
        KeyId=key["KeyId"])["Rotations"] or None, 30, what="an automatic rotation")
    assert [r["RotationType"] for r in rotations] == ["AUTOMATIC"]
    after = timed.client(survivors[1]).get_key_rotation_status(KeyId=key["KeyId"])
    assert after["NextRotationDate"] > first_due
    assert timed.client(survivors[1]).decrypt(CiphertextBlob=blob)["Plaintext"] == b"old"
    timed.restart(leader)
    wait_for(lambda: timed.client(leader).decrypt(CiphertextBlob=blob)["Plaintext"] == b"old",
             30, what="the restarted node")
