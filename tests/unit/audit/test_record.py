"""Tests for kmsd.audit.record: CloudTrail-shaped events and what they must never contain.

Shapes are checked against the AWS KMS Developer Guide's CloudTrail examples
(https://docs.aws.amazon.com/kms/latest/developerguide/ct-<operation>.html) and FACTS.md §A.12.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from kmsd.audit.chain import canonical_bytes
from kmsd.audit.record import (
    CRYPTO_OPERATIONS,
    REQUEST_MEMBERS,
    format_event_time,
    user_identity,
)
from tests.unit.audit.support import (
    ACCOUNT,
    ALICE,
    KEY_ARN,
    KEY_ID,
    OTHER_KEY_ARN,
    REGION,
    event,
)

CONTEXT = {"Department": "Engineering", "Project": "Alpha"}


def test_decrypt_matches_the_documented_cloudtrail_entry() -> None:
    # ct-decrypt / FACTS.md §A.12: the entry for a Decrypt with a symmetric key.
    logged = event("Decrypt", {"CiphertextBlob": b"\x01\x02ciphertext",
                               "EncryptionContext": CONTEXT},
                   {"KeyId": KEY_ARN, "Plaintext": b"plaintext!",
                    "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}).to_dict()
    assert list(logged) == [
        "eventVersion", "userIdentity", "eventTime", "eventSource", "eventName", "awsRegion",
        "sourceIPAddress", "userAgent", "requestParameters", "responseElements", "requestID",
        "eventID", "readOnly", "resources", "eventType", "managementEvent",
        "recipientAccountId", "eventCategory"]
    assert logged["eventVersion"] == "1.08"
    assert logged["userIdentity"] == {
        "type": "IAMUser", "principalId": ALICE, "arn": ALICE, "accountId": ACCOUNT,
        "accessKeyId": "EXAMPLE_KEY_ID", "userName": "Alice"}
    assert logged["eventTime"] == "2022-11-24T18:57:43Z"
    assert logged["eventSource"] == "kms.amazonaws.com"
    assert logged["eventName"] == "Decrypt"
    assert logged["awsRegion"] == REGION
    # "always includes the encryptionAlgorithm ... even if ... not specified"; keyId is the ARN.
    assert logged["requestParameters"] == {"encryptionAlgorithm": "SYMMETRIC_DEFAULT",
                                           "keyId": KEY_ARN, "encryptionContext": CONTEXT}
    # "The ciphertext in the request and the plaintext in the response are omitted."
    assert logged["responseElements"] is None
    assert logged["readOnly"] is True
    assert logged["resources"] == [{"accountId": ACCOUNT, "type": "AWS::KMS::Key",
                                    "ARN": KEY_ARN}]
    assert logged["eventType"] == "AwsApiCall"
    assert logged["managementEvent"] is True
    assert logged["recipientAccountId"] == ACCOUNT
    assert logged["eventCategory"] == "Management"
    assert "errorCode" not in logged and "errorMessage" not in logged


def test_decrypt_keyid_is_the_resolved_arn_whatever_the_caller_passed() -> None:
    for given in ({}, {"KeyId": "alias/app"}, {"KeyId": KEY_ID}):
        logged = event("Decrypt", {"CiphertextBlob": b"c", **given}).to_dict()
        assert logged["requestParameters"]["keyId"] == KEY_ARN
    explicit = event("Decrypt", {"CiphertextBlob": b"c", "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"})
    assert explicit.request_parameters == {"encryptionAlgorithm": "RSAES_OAEP_SHA_1",
                                           "keyId": KEY_ARN}


def test_encrypt() -> None:
    # ct-encrypt: encryptionContext, keyId (as the caller named the key), encryptionAlgorithm.
    logged = event("Encrypt", {"KeyId": KEY_ARN, "Plaintext": b"top secret",
                               "EncryptionContext": {"Department": "Engineering"}},
                   {"CiphertextBlob": b"\x01blob", "KeyId": KEY_ARN,
                    "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}).to_dict()
    assert logged["requestParameters"] == {"keyId": KEY_ARN,
                                           "encryptionContext": {"Department": "Engineering"},
                                           "encryptionAlgorithm": "SYMMETRIC_DEFAULT"}
    assert logged["responseElements"] is None
    assert logged["readOnly"] is True
    assert "top secret" not in json.dumps(logged)


@pytest.mark.parametrize("operation", ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext"])
def test_generate_data_key(operation: str) -> None:
    # ct-generatedatakey / ct-generatedatakeyplaintext: keyId, keySpec, encryptionContext; the
    # documented entries carry no encryptionAlgorithm (the operation has no such member).
    by_spec = event(operation, {"KeyId": KEY_ID, "KeySpec": "AES_256",
                                "EncryptionContext": CONTEXT},
                    {"CiphertextBlob": b"\x01wrapped", "Plaintext": b"k" * 32,
                     "KeyId": KEY_ARN}).to_dict()
    assert by_spec["requestParameters"] == {"keyId": KEY_ID, "keySpec": "AES_256",
                                            "encryptionContext": CONTEXT}
    assert by_spec["responseElements"] is None
    by_length = event(operation, {"KeyId": KEY_ID, "NumberOfBytes": 64}).to_dict()
    assert by_length["requestParameters"] == {"keyId": KEY_ID, "numberOfBytes": 64}


def test_reencrypt_lists_source_then_destination_key() -> None:
    # ct-reencrypt: algorithms always present; resources are the source key, then destination.
    logged = event("ReEncrypt", {"CiphertextBlob": b"c", "DestinationKeyId": "alias/dest",
                                 "SourceEncryptionContext": {"a": "1"},
                                 "DestinationEncryptionContext": {"Level": "3A"}},
                   {"CiphertextBlob": b"new", "SourceKeyId": KEY_ARN, "KeyId": OTHER_KEY_ARN},
                   key_arns=(KEY_ARN, OTHER_KEY_ARN)).to_dict()
    assert logged["requestParameters"] == {
        "destinationKeyId": "alias/dest", "sourceEncryptionContext": {"a": "1"},
        "destinationEncryptionContext": {"Level": "3A"},
        "sourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        "destinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
    assert [r["ARN"] for r in logged["resources"]] == [KEY_ARN, OTHER_KEY_ARN]
    assert logged["responseElements"] is None


def test_create_key_logs_a_small_key_metadata_summary() -> None:
    # ct-createkey: requestParameters in lower camel case, responseElements.keyMetadata.
    metadata = {
        "AWSAccountId": ACCOUNT, "KeyId": KEY_ID, "Arn": KEY_ARN, "CreationDate": 1660171107.25,
        "Enabled": True, "Description": "", "KeyUsage": "ENCRYPT_DECRYPT", "KeyState": "Enabled",
        "Origin": "AWS_KMS", "KeyManager": "CUSTOMER", "CustomerMasterKeySpec":
        "SYMMETRIC_DEFAULT", "KeySpec": "SYMMETRIC_DEFAULT",
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"], "MultiRegion": False,
        "CurrentKeyMaterialId": "ab" * 32}
    logged = event("CreateKey", {"Description": "", "KeyUsage": "ENCRYPT_DECRYPT",
                                 "KeySpec": "SYMMETRIC_DEFAULT", "Origin": "AWS_KMS",
                                 "BypassPolicyLockoutSafetyCheck": False,
                                 "Tags": [{"TagKey": "team", "TagValue": "payments"}]},
                   {"KeyMetadata": metadata}).to_dict()
    assert logged["requestParameters"] == {
        "description": "", "keyUsage": "ENCRYPT_DECRYPT", "keySpec": "SYMMETRIC_DEFAULT",
        "origin": "AWS_KMS", "bypassPolicyLockoutSafetyCheck": False,
        "tags": [{"tagKey": "team", "tagValue": "payments"}]}
    assert logged["responseElements"] == {"keyMetadata": {
        "AWSAccountId": ACCOUNT, "keyId": KEY_ID, "arn": KEY_ARN,
        "creationDate": "2022-08-10T22:38:27Z", "enabled": True, "description": "",
        "keyUsage": "ENCRYPT_DECRYPT", "keyState": "Enabled", "origin": "AWS_KMS",
        "keyManager": "CUSTOMER", "customerMasterKeySpec": "SYMMETRIC_DEFAULT",
        "keySpec": "SYMMETRIC_DEFAULT", "encryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "multiRegion": False}}
    assert logged["readOnly"] is False
    assert logged["resources"][0]["ARN"] == KEY_ARN


def test_describe_key_logs_no_response() -> None:
    # ct-describekey: responseElements null, readOnly true.
    logged = event("DescribeKey", {"KeyId": KEY_ID}, {"KeyMetadata": {"KeyId": KEY_ID}})
    assert logged.response_elements is None
    assert logged.read_only is True
    assert logged.request_parameters == {"keyId": KEY_ID}


@pytest.mark.parametrize("operation", ["DisableKey", "EnableKey", "UpdateKeyDescription",
                                       "PutKeyPolicy"])
def test_key_management_calls_log_the_key_arn_as_response(operation: str) -> None:
    # ct-disablekey / ct-enablekey: responseElements.keyId is the key ARN "even though this
    # operation does not return the key ARN".
    logged = event(operation, {"KeyId": KEY_ID}, {})
    assert logged.response_elements == {"keyId": KEY_ARN}
    assert logged.read_only is False


def test_update_alias_resources_and_response() -> None:
    # ct-updatealias: resources hold the alias and the key; responseElements.keyId the key ARN.
    alias = f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/my_alias"
    logged = event("UpdateAlias", {"AliasName": "alias/my_alias", "TargetKeyId": KEY_ID}, {},
                   key_arns=(alias, KEY_ARN)).to_dict()
    assert logged["requestParameters"] == {"aliasName": "alias/my_alias", "targetKeyId": KEY_ID}
    assert logged["responseElements"] == {"keyId": KEY_ARN}
    assert [r["ARN"] for r in logged["resources"]] == [alias, KEY_ARN]


def test_create_grant_logs_the_grant_id_not_the_token() -> None:
    logged = event("CreateGrant", {"KeyId": KEY_ID, "GranteePrincipal": ALICE,
                                   "Operations": ["Decrypt"],
                                   "Constraints": {"EncryptionContextSubset": {"Dept": "Eng"}}},
                   {"GrantToken": "SECRET-LOOKING-TOKEN", "GrantId": "g-1"})
    assert logged.response_elements == {"grantId": "g-1", "keyId": KEY_ARN}
    assert logged.request_parameters == {
        "keyId": KEY_ID, "granteePrincipal": ALICE, "operations": ["Decrypt"],
        "constraints": {"encryptionContextSubset": {"Dept": "Eng"}}}


def test_failed_call_carries_error_and_no_response() -> None:
    # FACTS.md §A.12 / ct-decrypt (failure): errorCode and errorMessage, responseElements null.
    logged = event("Decrypt", {"CiphertextBlob": b"\x01bad", "EncryptionContext": CONTEXT},
                   {"Plaintext": b"must not appear"}, error_code="IncorrectKeyException",
                   error_message="The key ID in the request does not identify a CMK that can "
                                 "perform this operation.").to_dict()
    assert logged["errorCode"] == "IncorrectKeyException"
    assert logged["errorMessage"].startswith("The key ID in the request")
    assert logged["responseElements"] is None
    assert logged["requestParameters"]["encryptionContext"] == CONTEXT
    assert list(logged).index("errorCode") < list(logged).index("requestParameters")
    assert "must not appear" not in json.dumps(logged)


def test_denied_call_before_any_key_resolved() -> None:
    logged = event("CreateKey", {"Description": "x"}, None, error_code="AccessDeniedException",
                   error_message="User is not authorized", key_arns=()).to_dict()
    assert "resources" not in logged
    assert logged["recipientAccountId"] == ACCOUNT
    assert logged["responseElements"] is None
    assert logged["errorCode"] == "AccessDeniedException"


@pytest.mark.parametrize(("arn", "kind", "user_name", "principal_id"), [
    (f"arn:aws:iam::{ACCOUNT}:user/Alice", "IAMUser", "Alice", None),
    (f"arn:aws:iam::{ACCOUNT}:user/division/team/Bob", "IAMUser", "Bob", None),
    (f"arn:aws:iam::{ACCOUNT}:root", "Root", None, ACCOUNT),
    (f"arn:aws:sts::{ACCOUNT}:assumed-role/Admin/session-1", "AssumedRole", None, None),
    (f"arn:aws-cn:iam::{ACCOUNT}:user/Li", "IAMUser", "Li", None),
    (f"arn:aws:iam::{ACCOUNT}:role/Admin", "Unknown", None, None),
    ("not-an-arn", "Unknown", None, None),
])
def test_user_identity_type_from_the_principal_arn(arn: str, kind: str, user_name: str | None,
                                                   principal_id: str | None) -> None:
    identity = user_identity(arn, ACCOUNT, "AKIDEXAMPLE")
    assert identity.identity_type == kind
    assert identity.user_name == user_name
    assert identity.principal_id == (principal_id or arn)
    shown = identity.to_dict()
    assert ("userName" in shown) == (user_name is not None)
    assert user_identity(arn, ACCOUNT, "AKID", principal_id="AIDAEXAMPLE").principal_id == \
        "AIDAEXAMPLE"


def test_event_time_is_utc_whole_seconds() -> None:
    assert format_event_time(0) == "1970-01-01T00:00:00Z"
    assert format_event_time(1669316263.999) == "2022-11-24T18:57:43Z"
    assert format_event_time(datetime(2025, 5, 20, 20, 45, tzinfo=UTC).timestamp()) == \
        "2025-05-20T20:45:00Z"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError):
            format_event_time(bad)


def test_building_is_deterministic_and_canonically_encodable() -> None:
    args = ("Encrypt", {"KeyId": KEY_ID, "Plaintext": b"x", "EncryptionContext": CONTEXT})
    first, second = event(*args), event(*args)
    assert first == second
    assert canonical_bytes(first.to_dict()) == canonical_bytes(second.to_dict())


def test_members_of_the_wrong_kind_or_unknown_are_dropped() -> None:
    logged = event("Encrypt", {"KeyId": b"bytes where a string belongs",
                               "EncryptionContext": {"k": b"v", "ok": "yes"},
                               "GrantTokens": ["t1", b"t2"],
                               "NumberOfBytes": 1.5,
                               "FutureBlobMember": b"secret", "FutureStringMember": "x"})
    assert logged.request_parameters == {"encryptionContext": {"ok": "yes"},
                                         "grantTokens": ["t1"],
                                         "encryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def test_timestamps_in_parameters_are_iso_strings() -> None:
    logged = event("ImportKeyMaterial", {"KeyId": KEY_ID, "ImportToken": b"tok",
                                         "EncryptedKeyMaterial": b"material",
                                         "ValidTo": datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
                                         "ExpirationModel": "KEY_MATERIAL_EXPIRES"}, {})
    assert logged.request_parameters == {"keyId": KEY_ID, "validTo": "2030-01-02T03:04:05Z",
                                         "expirationModel": "KEY_MATERIAL_EXPIRES"}


def test_crypto_operations_are_read_only_and_have_defaults_or_not() -> None:
    for operation in CRYPTO_OPERATIONS:
        logged = event(operation, {"KeyId": KEY_ID}, {"KeyId": KEY_ARN})
        assert logged.read_only is True
        assert logged.response_elements is None


def test_allow_list_names_are_model_member_names() -> None:
    # Guards against typos: every allow-listed request member exists in the KMS model.
    import botocore.session

    model = botocore.session.get_session().get_service_model("kms")
    names: set[str] = set()
    for operation in model.operation_names:
        shape = model.operation_model(operation).input_shape
        if shape is not None:
            names.update(shape.members)
    assert set(REQUEST_MEMBERS) <= names, sorted(set(REQUEST_MEMBERS) - names)
