"""Who may do what: identity policies, key policies with conditions, grants, the admin API."""

from __future__ import annotations

import json
import urllib.error
import uuid
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.harness import Cluster, wait_for


def denied(call: Any) -> str:
    with pytest.raises(ClientError) as excinfo:
        call()
    assert excinfo.value.response["Error"]["Code"] == "AccessDeniedException"
    return excinfo.value.response["Error"]["Message"]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_alice_may_encrypt_but_not_decrypt(cluster: Cluster) -> None:
    alice = cluster.new_user(unique("alice"), {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["kms:Encrypt", "kms:DescribeKey"],
                       "Resource": "*"}]})
    key = cluster.client(0).create_key()["KeyMetadata"]
    blob = cluster.as_user(1, alice).encrypt(KeyId=key["KeyId"], Plaintext=b"a")["CiphertextBlob"]
    message = denied(lambda: cluster.as_user(2, alice).decrypt(CiphertextBlob=blob))
    # AWS's form: "User: <arn> is not authorized to perform: kms:Decrypt on resource: <key arn>
    # because no identity-based policy allows the kms:Decrypt action"
    assert message == (f"User: {alice['arn']} is not authorized to perform: kms:Decrypt on "
                       f"resource: {key['Arn']} because no identity-based policy allows the "
                       "kms:Decrypt action")
    denied(lambda: cluster.as_user(0, alice).create_key())
    denied(lambda: cluster.as_user(0, alice).disable_key(KeyId=key["KeyId"]))
    assert cluster.client(0).decrypt(CiphertextBlob=blob)["Plaintext"] == b"a"


def test_bob_decrypts_only_through_a_constrained_grant_until_revoked(cluster: Cluster) -> None:
    bob = cluster.new_user(unique("bob"))
    key = cluster.client(0).create_key()["KeyMetadata"]
    acme = cluster.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"acme data",
                                     EncryptionContext={"tenant": "acme"})["CiphertextBlob"]
    other = cluster.client(0).encrypt(KeyId=key["KeyId"], Plaintext=b"other data",
                                      EncryptionContext={"tenant": "globex"})["CiphertextBlob"]
    denied(lambda: cluster.as_user(2, bob).decrypt(CiphertextBlob=acme,
                                                   EncryptionContext={"tenant": "acme"}))
    grant = cluster.client(0).create_grant(
        KeyId=key["KeyId"], GranteePrincipal=bob["arn"], Operations=["Decrypt"],
        Constraints={"EncryptionContextSubset": {"tenant": "acme"}}, Name="bob-acme")
    # The grant token makes the grant usable at once, on another node.
    out = cluster.as_user(2, bob).decrypt(CiphertextBlob=acme, GrantTokens=[grant["GrantToken"]],
                                          EncryptionContext={"tenant": "acme"})
    assert out["Plaintext"] == b"acme data"
    denied(lambda: cluster.as_user(1, bob).decrypt(
        CiphertextBlob=other, EncryptionContext={"tenant": "globex"}))
    denied(lambda: cluster.as_user(1, bob).encrypt(KeyId=key["KeyId"], Plaintext=b"x"))
    listed = cluster.client(1).list_grants(KeyId=key["KeyId"])["Grants"]
    assert [(g["GrantId"], g["GranteePrincipal"], g["Operations"], g["Name"]) for g in listed] \
        == [(grant["GrantId"], bob["arn"], ["Decrypt"], "bob-acme")]
    assert listed[0]["Constraints"] == {"EncryptionContextSubset": {"tenant": "acme"}}
    # Same name and parameters: the same grant, not a second one.
    again = cluster.client(0).create_grant(
        KeyId=key["KeyId"], GranteePrincipal=bob["arn"], Operations=["Decrypt"],
        Constraints={"EncryptionContextSubset": {"tenant": "acme"}}, Name="bob-acme")
    assert again["GrantId"] == grant["GrantId"]
    cluster.client(0).revoke_grant(KeyId=key["KeyId"], GrantId=grant["GrantId"])
    for node in range(cluster.size):
        wait_for(lambda n=node: _is_denied(lambda: cluster.as_user(n, bob).decrypt(
            CiphertextBlob=acme, EncryptionContext={"tenant": "acme"})), 10,
            what=f"revocation on node {node}")
    assert cluster.client(1).list_grants(KeyId=key["KeyId"])["Grants"] == []
    with pytest.raises(ClientError) as excinfo:
        cluster.as_user(0, bob).decrypt(CiphertextBlob=acme, GrantTokens=["not-a-token"],
                                        EncryptionContext={"tenant": "acme"})
    assert excinfo.value.response["Error"]["Code"] == "InvalidGrantTokenException"


def _is_denied(call: Any) -> bool | None:
    try:
        call()
    except ClientError as error:
        return error.response["Error"]["Code"] == "AccessDeniedException" or None
    return None


def test_retire_grant_by_the_retiring_principal(cluster: Cluster) -> None:
    carol = cluster.new_user(unique("carol"))
    key = cluster.client(0).create_key()["KeyMetadata"]
    grant = cluster.client(0).create_grant(KeyId=key["KeyId"], GranteePrincipal=carol["arn"],
                                           RetiringPrincipal=carol["arn"],
                                           Operations=["Encrypt"])
    # ListRetirableGrants needs an IAM permission carol does not have; the root lists them.
    retirable = cluster.client(1).list_retirable_grants(RetiringPrincipal=carol["arn"])
    assert grant["GrantId"] in [g["GrantId"] for g in retirable["Grants"]]
    cluster.as_user(1, carol).encrypt(KeyId=key["KeyId"], Plaintext=b"c",
                                      GrantTokens=[grant["GrantToken"]])
    cluster.as_user(2, carol).retire_grant(GrantToken=grant["GrantToken"])
    wait_for(lambda: _is_denied(lambda: cluster.as_user(0, carol).encrypt(
        KeyId=key["KeyId"], Plaintext=b"c")), 10, what="retirement")


def test_key_policy_condition_on_encryption_context(cluster: Cluster) -> None:
    dave = cluster.new_user(unique("dave"))
    key = cluster.client(0).create_key()["KeyMetadata"]
    account = cluster.info["account_id"]
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
         "Principal": {"AWS": f"arn:aws:iam::{account}:root"}, "Action": "kms:*",
         "Resource": "*"},
        {"Sid": "Tenant acme only", "Effect": "Allow", "Principal": {"AWS": dave["arn"]},
         "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*",
         "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "acme"}}}]}
    cluster.client(1).put_key_policy(KeyId=key["KeyId"], PolicyName="default",
                                     Policy=json.dumps(policy))
    wait_for(lambda: json.loads(cluster.client(2).get_key_policy(
        KeyId=key["KeyId"], PolicyName="default")["Policy"]) == policy, 5, what="new policy")
    blob = wait_for(lambda: cluster.as_user(2, dave).encrypt(
        KeyId=key["KeyId"], Plaintext=b"d", EncryptionContext={"tenant": "acme"}), 5)
    assert cluster.as_user(0, dave).decrypt(CiphertextBlob=blob["CiphertextBlob"],
                                            EncryptionContext={"tenant": "acme"})["Plaintext"] \
        == b"d"
    message = denied(lambda: cluster.as_user(0, dave).encrypt(
        KeyId=key["KeyId"], Plaintext=b"d", EncryptionContext={"tenant": "globex"}))
    # The root statement delegates to the account, so the refusal names identity policies.
    assert message.endswith("because no identity-based policy allows the kms:Encrypt action")
    policy["Statement"].append({"Effect": "Deny", "Principal": {"AWS": dave["arn"]},
                                "Action": "kms:Decrypt", "Resource": "*"})
    cluster.client(0).put_key_policy(KeyId=key["KeyId"], PolicyName="default",
                                     Policy=json.dumps(policy))
    message = wait_for(lambda: _denied_message(lambda: cluster.as_user(1, dave).decrypt(
        CiphertextBlob=blob["CiphertextBlob"], EncryptionContext={"tenant": "acme"})), 5)
    assert message.endswith("with an explicit deny in a resource-based policy")


def _denied_message(call: Any) -> str | None:
    try:
        call()
    except ClientError as error:
        if error.response["Error"]["Code"] == "AccessDeniedException":
            return error.response["Error"]["Message"]
    return None


def test_malformed_and_lockout_policies_are_refused(cluster: Cluster) -> None:
    key = cluster.client(0).create_key()["KeyMetadata"]
    for bad in ("not json", json.dumps({"Version": "2012-10-17"}),
                json.dumps({"Version": "2012-10-17", "Statement": [
                    {"Effect": "Maybe", "Principal": "*", "Action": "kms:*",
                     "Resource": "*"}]})):
        with pytest.raises(ClientError) as excinfo:
            cluster.client(0).put_key_policy(KeyId=key["KeyId"], PolicyName="default",
                                             Policy=bad)
        assert excinfo.value.response["Error"]["Code"] == "MalformedPolicyDocumentException"
    lockout = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{cluster.info['account_id']}"
                                                 ":root"},
         "Action": "kms:Encrypt", "Resource": "*"}]})
    with pytest.raises(ClientError) as excinfo:
        cluster.client(0).put_key_policy(KeyId=key["KeyId"], PolicyName="default",
                                         Policy=lockout)
    assert excinfo.value.response["Error"]["Code"] == "MalformedPolicyDocumentException"
    with pytest.raises(ClientError) as excinfo:
        cluster.client(0).create_key(Policy=lockout)
    assert excinfo.value.response["Error"]["Code"] == "MalformedPolicyDocumentException"
    created = cluster.client(0).create_key(Policy=lockout, BypassPolicyLockoutSafetyCheck=True)
    assert created["KeyMetadata"]["KeyState"] == "Enabled"


def test_admin_api_is_for_the_root_and_deleting_a_user_revokes_its_keys(
        cluster: Cluster) -> None:
    erin = cluster.new_user(unique("erin"), {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})
    from botocore.credentials import Credentials

    with pytest.raises(urllib.error.HTTPError) as excinfo:
        cluster.admin(1, "GET", "/v1/principals",
                      credentials=Credentials(erin["access_key_id"], erin["secret_access_key"]))
    assert json.loads(excinfo.value.read())["__type"] == "AccessDeniedException"
    listed = cluster.admin(1, "GET", "/v1/principals")["Principals"]
    entry = next(p for p in listed if p["Arn"] == erin["arn"])
    assert entry["AccessKeys"] == [erin["access_key_id"]] and entry["Policies"] == ["main"]
    assert "SecretAccessKey" not in json.dumps(listed)
    name = erin["arn"].rsplit("/", 1)[1]
    cluster.admin(0, "DELETE", f"/v1/principals/user/{name}")
    for node in range(cluster.size):
        wait_for(lambda n=node: _code(lambda: cluster.as_user(n, erin).list_keys())
                 == "UnrecognizedClientException", 10, what="the deleted user's key")


def _code(call: Any) -> str | None:
    try:
        call()
    except ClientError as error:
        return error.response["Error"]["Code"]
    return None
