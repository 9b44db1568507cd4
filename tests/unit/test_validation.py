"""Tests for kmsd.api.validation: concrete AWS-shaped cases and model-driven properties."""

from __future__ import annotations

import base64
import contextlib
import re
from datetime import UTC, datetime
from typing import Any

import botocore.model
import botocore.session
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsd.api.validation import RequestValidator
from kmsd.errors import SerializationException, UnknownOperationException, ValidationException

MODEL = botocore.session.get_session().get_service_model("kms")
VALIDATOR = RequestValidator(MODEL)
KEY_ARN = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def validation_message(operation: str, body: object) -> str:
    with pytest.raises(ValidationException) as info:
        VALIDATOR.validate(operation, body)
    return info.value.message


# --- concrete cases --------------------------------------------------------------------------

def test_operation_names_cover_the_model() -> None:
    assert VALIDATOR.operation_names == frozenset(MODEL.operation_names)
    assert {"Encrypt", "Decrypt", "CreateKey", "ListKeys"} <= VALIDATOR.operation_names


def test_default_constructor_loads_kms_model() -> None:
    assert RequestValidator().operation_names == VALIDATOR.operation_names


def test_unknown_operation() -> None:
    with pytest.raises(UnknownOperationException):
        VALIDATOR.validate("NoSuchOperation", {})


def test_encrypt_valid_decodes_blob_and_drops_unknown_and_null_members() -> None:
    params = VALIDATOR.validate("Encrypt", {
        "KeyId": KEY_ARN, "Plaintext": b64(b"secret data"),
        "EncryptionContext": {"purpose": "test"}, "GrantTokens": ["tok"],
        "EncryptionAlgorithm": "SYMMETRIC_DEFAULT", "DryRun": False,
        "SomethingNew": 1, "Description": None,
    })
    assert params == {
        "KeyId": KEY_ARN, "Plaintext": b"secret data", "EncryptionContext": {"purpose": "test"},
        "GrantTokens": ["tok"], "EncryptionAlgorithm": "SYMMETRIC_DEFAULT", "DryRun": False,
    }


def test_decrypt_valid() -> None:
    params = VALIDATOR.validate("Decrypt", {"CiphertextBlob": b64(b"\x01" * 200),
                                            "KeyId": "alias/mine"})
    assert params == {"CiphertextBlob": b"\x01" * 200, "KeyId": "alias/mine"}


def test_nested_blob_is_decoded() -> None:
    params = VALIDATOR.validate("Decrypt", {
        "CiphertextBlob": b64(b"c"),
        "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                      "AttestationDocument": b64(b"doc")},
    })
    assert params["Recipient"]["AttestationDocument"] == b"doc"


def test_create_key_alias_list_keys_generate_data_key_valid() -> None:
    assert VALIDATOR.validate("CreateKey", {
        "KeySpec": "SYMMETRIC_DEFAULT", "KeyUsage": "ENCRYPT_DECRYPT", "Description": "",
        "Tags": [{"TagKey": "team", "TagValue": "core"}],
    })["Tags"] == [{"TagKey": "team", "TagValue": "core"}]
    alias = VALIDATOR.validate("CreateAlias", {"AliasName": "alias/my-key", "TargetKeyId": KEY_ARN})
    assert alias == {"AliasName": "alias/my-key", "TargetKeyId": KEY_ARN}
    assert VALIDATOR.validate("ListKeys", {"Limit": 1000, "Marker": "abc"}) == {
        "Limit": 1000, "Marker": "abc"}
    assert VALIDATOR.validate("ListKeys", {}) == {}
    assert VALIDATOR.validate("GenerateDataKey", {"KeyId": KEY_ARN, "KeySpec": "AES_256"}) == {
        "KeyId": KEY_ARN, "KeySpec": "AES_256"}


def test_timestamp_becomes_aware_utc_datetime() -> None:
    params = VALIDATOR.validate("ImportKeyMaterial", {
        "KeyId": KEY_ARN, "ImportToken": b64(b"t"), "EncryptedKeyMaterial": b64(b"m"),
        "ValidTo": 1700000000.5,
    })
    assert params["ValidTo"] == datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)
    with pytest.raises(SerializationException, match="validTo"):
        VALIDATOR.validate("ImportKeyMaterial", {
            "KeyId": KEY_ARN, "ImportToken": b64(b"t"), "EncryptedKeyMaterial": b64(b"m"),
            "ValidTo": "2023-11-14T22:13:20Z",
        })


def test_missing_key_id_exact_message() -> None:
    assert validation_message("GenerateDataKey", {}) == (
        "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: "
        "Member must not be null")


def test_plaintext_too_long_never_echoed() -> None:
    plaintext = b"Z" * 4097
    message = validation_message("Encrypt", {"KeyId": KEY_ARN, "Plaintext": b64(plaintext)})
    assert message == (
        "1 validation error detected: Value at 'plaintext' failed to satisfy constraint: "
        "Member must have length less than or equal to 4096")
    assert "ZZZZ" not in message and b64(plaintext)[:16] not in message


def test_sensitive_string_never_echoed() -> None:
    message = validation_message("CreateCustomKeyStore", {"CustomKeyStoreName": "store",
                                                          "KeyStorePassword": "hunter"})
    assert "hunter" not in message
    assert "Value at 'keyStorePassword'" in message


def test_key_spec_enum_lists_model_values() -> None:
    values = ", ".join(MODEL.shape_for("KeySpec").enum)
    assert validation_message("CreateKey", {"KeySpec": "AES_999"}) == (
        "1 validation error detected: Value 'AES_999' at 'keySpec' failed to satisfy "
        f"constraint: Member must satisfy enum value set: [{values}]")


@pytest.mark.parametrize(("limit", "text"), [
    (0, "Member must have value greater than or equal to 1"),
    (1001, "Member must have value less than or equal to 1000"),
])
def test_list_keys_limit_range(limit: int, text: str) -> None:
    assert validation_message("ListKeys", {"Limit": limit}) == (
        f"1 validation error detected: Value '{limit}' at 'limit' failed to satisfy "
        f"constraint: {text}")


def test_two_violations() -> None:
    assert validation_message("Encrypt", {"KeyId": ""}) == (
        "2 validation errors detected: "
        "Value '' at 'keyId' failed to satisfy constraint: "
        "Member must have length greater than or equal to 1; "
        "Value null at 'plaintext' failed to satisfy constraint: Member must not be null")


def test_nested_paths() -> None:
    message = validation_message("CreateKey", {"Tags": [{"TagKey": "ok", "TagValue": "v"},
                                                        {"TagKey": ""}]})
    assert message == (
        "2 validation errors detected: "
        "Value '' at 'tags.2.member.tagKey' failed to satisfy constraint: "
        "Member must have length greater than or equal to 1; "
        "Value null at 'tags.2.member.tagValue' failed to satisfy constraint: "
        "Member must not be null")
    message = validation_message("CreateGrant", {
        "KeyId": KEY_ARN, "Operations": ["Decrypt"], "Constraints": {"SourceArn": "arn:short"}})
    assert "Value 'arn:short' at 'constraints.sourceArn'" in message


def test_list_length_and_element_constraints() -> None:
    message = validation_message("Decrypt", {"GrantTokens": [f"t{i}" for i in range(11)]})
    assert message == (
        "1 validation error detected: Value '[t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10]' "
        "at 'grantTokens' failed to satisfy constraint: "
        "Member must have length less than or equal to 10")
    assert "'grantTokens.1.member'" in validation_message("Decrypt", {"GrantTokens": [""]})
    message = validation_message("CreateGrant", {"KeyId": KEY_ARN, "Operations": ["Fly"]})
    assert "Value 'Fly' at 'operations.1.member' failed to satisfy constraint: " in message


def test_pattern_violation() -> None:
    assert validation_message("CreateAlias", {"AliasName": "alias/bad name",
                                              "TargetKeyId": KEY_ARN}) == (
        "1 validation error detected: Value 'alias/bad name' at 'aliasName' failed to "
        "satisfy constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$")


def test_null_map_value_is_a_map_value_violation() -> None:
    message = validation_message("Decrypt", {"EncryptionContext": {"a": None}})
    assert "at 'encryptionContext' failed to satisfy constraint: Map value must satisfy" in message


def test_blob_minimum_counts_decoded_bytes() -> None:
    message = validation_message("Decrypt", {"CiphertextBlob": ""})
    assert message == (
        "1 validation error detected: Value at 'ciphertextBlob' failed to satisfy constraint: "
        "Member must have length greater than or equal to 1")


@pytest.mark.parametrize("body", [[], "Decrypt", None, 3, True])
def test_body_not_an_object(body: object) -> None:
    with pytest.raises(SerializationException, match="request body"):
        VALIDATOR.validate("Decrypt", body)


@pytest.mark.parametrize(("operation", "body", "member"), [
    ("ListKeys", {"Limit": "10"}, "limit"),
    ("ListKeys", {"Limit": 10.5}, "limit"),
    ("ListKeys", {"Limit": True}, "limit"),
    ("ListKeys", {"Limit": 2**40}, "limit"),
    ("Encrypt", {"KeyId": 5, "Plaintext": "AA=="}, "keyId"),
    ("Encrypt", {"KeyId": "k", "Plaintext": "AA==", "DryRun": "true"}, "dryRun"),
    ("Encrypt", {"KeyId": "k", "Plaintext": "AA==", "GrantTokens": "tok"}, "grantTokens"),
    ("Encrypt", {"KeyId": "k", "Plaintext": "AA==", "GrantTokens": [1]}, "grantTokens.1.member"),
    ("Encrypt", {"KeyId": "k", "Plaintext": "AA==", "EncryptionContext": []},
     "encryptionContext"),
    ("Encrypt", {"KeyId": "k", "Plaintext": ["AA=="]}, "plaintext"),
    ("CreateGrant", {"KeyId": "k", "Operations": [], "Constraints": "x"}, "constraints"),
])
def test_wrong_json_types(operation: str, body: dict[str, Any], member: str) -> None:
    with pytest.raises(SerializationException) as info:
        VALIDATOR.validate(operation, body)
    assert f"'{member}'" in info.value.message


@pytest.mark.parametrize("blob", ["not base64!", "QUJD=", "QUJ", "wqnDqQ==\n", "é"])
def test_bad_base64(blob: str) -> None:
    with pytest.raises(SerializationException) as info:
        VALIDATOR.validate("Encrypt", {"KeyId": "k", "Plaintext": blob})
    assert "'plaintext'" in info.value.message and blob not in info.value.message


def test_type_error_wins_over_constraint_errors() -> None:
    with pytest.raises(SerializationException):
        VALIDATOR.validate("Encrypt", {"KeyId": "", "GrantTokens": {}})


# --- property tests --------------------------------------------------------------------------
# A strategy per shape yields (wire value, expected validated value) pairs.

def _simple_class(pattern: str) -> str | None:
    """The character class of a `^[...]+$`-style pattern, generated per character."""
    found = re.fullmatch(r"\^?(\[[^\]]+\])[+*]\$?", pattern)
    return found.group(1) if found else None


def _string(shape: botocore.model.Shape) -> st.SearchStrategy[str]:
    md = shape.metadata
    if shape.enum:
        return st.sampled_from(shape.enum)
    lo, hi = md.get("min", 0), min(md.get("max", 40), md.get("min", 0) + 40)
    if "pattern" not in md:
        return st.text(min_size=lo, max_size=hi)
    rx = re.compile(md["pattern"], re.ASCII)
    char_class = _simple_class(md["pattern"])
    if char_class is not None:
        # Every model class lies inside Latin-1, so enumerating it is exact and cheap.
        alphabet = [c for c in map(chr, range(256)) if re.fullmatch(char_class, c, re.ASCII)]
        return st.text(st.sampled_from(alphabet), min_size=max(lo, 1), max_size=max(hi, 1))
    # Structured patterns (URIs, ARNs, regions) mostly fit their lengths already; a pattern
    # whose lengths could not be met would fail the health check here rather than be skipped.
    return st.from_regex(rx, fullmatch=True).filter(
        lambda s: md.get("min", 0) <= len(s) <= md.get("max", 10**9) and rx.fullmatch(s))


def _pairs(shape: botocore.model.Shape) -> st.SearchStrategy[tuple[Any, Any]]:
    md, kind = shape.metadata, shape.type_name
    if kind == "string":
        return _string(shape).map(lambda s: (s, s))
    if kind == "blob":
        lo = md.get("min", 0)
        return st.binary(min_size=lo, max_size=min(md.get("max", 64), lo + 64)).map(
            lambda b: (b64(b), b))
    if kind in ("integer", "long"):
        return st.integers(md.get("min", -(2**31)), md.get("max", 2**31 - 1)).map(
            lambda n: (n, n))
    if kind == "boolean":
        return st.booleans().map(lambda b: (b, b))
    if kind == "timestamp":
        return st.integers(0, 2**32).map(lambda n: (n, datetime.fromtimestamp(n, UTC)))
    if kind == "list":
        lo = md.get("min", 0)
        return st.lists(_pairs(shape.member), min_size=lo,
                        max_size=min(md.get("max", 3), lo + 3)).map(
            lambda items: ([w for w, _ in items], [e for _, e in items]))
    if kind == "map":
        return st.dictionaries(_string(shape.key), _pairs(shape.value), max_size=3).map(
            lambda d: ({k: w for k, (w, _) in d.items()}, {k: e for k, (_, e) in d.items()}))
    assert kind == "structure", kind
    required = set(shape.required_members)
    members = {name: _pairs(m) for name, m in shape.members.items()}
    return st.fixed_dictionaries(
        {n: s for n, s in members.items() if n in required},
        optional={n: s for n, s in members.items() if n not in required},
    ).map(lambda d: ({k: w for k, (w, _) in d.items()}, {k: e for k, (_, e) in d.items()}))


def _member_names() -> list[str]:
    names: set[str] = set()
    seen: set[str] = set()

    def walk(shape: botocore.model.Shape) -> None:
        if shape.name in seen:
            return
        seen.add(shape.name)
        if shape.type_name == "structure":
            names.update(shape.members)
            for member in shape.members.values():
                walk(member)
        elif shape.type_name == "list":
            walk(shape.member)
        elif shape.type_name == "map":
            walk(shape.value)

    for operation in MODEL.operation_names:
        walk(MODEL.operation_model(operation).input_shape)
    return sorted(names)


OPERATIONS = sorted(MODEL.operation_names)
_FAST = settings(max_examples=15, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("operation", OPERATIONS)
@_FAST
@given(data=st.data())
def test_bodies_within_constraints_validate(operation: str, data: st.DataObject) -> None:
    wire, expected = data.draw(_pairs(MODEL.operation_model(operation).input_shape))
    assert VALIDATOR.validate(operation, wire) == expected


_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
            | st.text(max_size=8) | st.sampled_from(["AA==", "SYMMETRIC_DEFAULT", KEY_ARN]))
_KEYS = st.sampled_from(_member_names()) | st.text(max_size=4)
JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(_KEYS, inner, max_size=5), max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(operation=st.sampled_from(OPERATIONS), body=JSON | st.dictionaries(_KEYS, JSON, max_size=6))
def test_arbitrary_json_only_raises_aws_errors(operation: str, body: object) -> None:
    with contextlib.suppress(ValidationException, SerializationException):
        VALIDATOR.validate(operation, body)
