"""No blob and no sensitive value of any KMS operation ever reaches an audit event.

Driven by the KMS service model botocore ships, so an operation or a blob member that AWS adds
later is covered without touching this test: every operation gets a request (and a response)
with every member filled in -- every blob with recognisable bytes, every string with a marker,
every `sensitive` string with a secret marker -- and the event built from it must hold no
bytes object and none of those blobs in any spelling (raw, base64, URL-safe base64, hex), and
no secret marker.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import botocore.model
import botocore.session
import pytest

from kmsd.audit.chain import canonical_bytes
from kmsd.audit.record import REQUEST_MEMBERS, RESPONSE_MEMBERS, AuditEvent
from tests.unit.audit.support import KEY_ARN, OTHER_KEY_ARN, event

MODEL = botocore.session.get_session().get_service_model("kms")
OPERATIONS = sorted(MODEL.operation_names)


class Filler:
    """Builds a value for a shape with every member present, remembering blobs and secrets."""

    def __init__(self, operation: str) -> None:
        self.operation = operation
        self.blobs: dict[str, bytes] = {}
        self.secrets: dict[str, str] = {}

    def fill(self, shape: botocore.model.Shape, path: str) -> Any:
        kind = shape.type_name
        if kind == "structure":
            assert isinstance(shape, botocore.model.StructureShape)
            return {name: self.fill(member, f"{path}.{name}")
                    for name, member in shape.members.items()}
        if kind == "list":
            assert isinstance(shape, botocore.model.ListShape)
            return [self.fill(shape.member, f"{path}[0]")]
        if kind == "map":
            assert isinstance(shape, botocore.model.MapShape)
            return {f"mapkey-{path}": self.fill(shape.value, f"{path}{{}}")}
        if kind == "blob":
            # Recognisable, unique per member, and full of non-text bytes.
            value = (b"\x00BLOB:" + path.encode() + b":"
                     + hashlib.sha256(path.encode()).digest() + bytes(range(256)))
            self.blobs[path] = value
            return value
        if kind == "string":
            if shape.metadata.get("sensitive"):
                value = f"SECRET-{path}"
                self.secrets[path] = value
                return value
            return f"marker-{path}"
        if kind in ("integer", "long"):
            return 7
        if kind in ("float", "double"):
            return 7.5
        if kind == "boolean":
            return True
        if kind == "timestamp":
            return datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
        raise AssertionError(f"unhandled shape type {kind} at {path}")


def spellings(blob: bytes) -> list[str]:
    return [blob.decode("latin-1"), base64.b64encode(blob).decode(),
            base64.urlsafe_b64encode(blob).decode(), blob.hex(),
            base64.b64encode(blob[:48]).decode()]  # a prefix, in case of truncation


def walk(value: Any, path: str = "$") -> list[str]:
    """Paths of every bytes-like or non-JSON value in an event."""
    if isinstance(value, bytes | bytearray | memoryview):
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in walk(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in walk(v, f"{path}[{i}]")]
    if value is None or isinstance(value, str | bool | int):
        return []
    return [path]  # floats included: the chain could not encode them


def events_for(operation: str) -> tuple[list[AuditEvent], Filler]:
    filler = Filler(operation)
    op = MODEL.operation_model(operation)
    params = filler.fill(op.input_shape, f"{operation}.in") if op.input_shape else {}
    response = filler.fill(op.output_shape, f"{operation}.out") if op.output_shape else {}
    keys = (KEY_ARN, OTHER_KEY_ARN)
    return [event(operation, params, response, key_arns=keys),
            event(operation, params, response, key_arns=()),
            event(operation, params, None, error_code="AccessDeniedException",
                  error_message="denied", key_arns=keys)], filler


def test_the_model_has_the_operations_we_expect() -> None:
    assert len(OPERATIONS) >= 50
    assert {"Decrypt", "Encrypt", "GenerateDataKey", "ImportKeyMaterial", "Sign",
            "GenerateMac", "CreateCustomKeyStore"} <= set(OPERATIONS)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_no_blob_or_secret_reaches_the_event(operation: str) -> None:
    built, filler = events_for(operation)
    for audit_event in built:
        logged = audit_event.to_dict()
        assert walk(logged) == [], f"{operation}: non-JSON values at {walk(logged)}"
        # Both spellings: plain JSON, and the canonical form the chain hashes and stores.
        text = json.dumps(logged, ensure_ascii=False) + canonical_bytes(logged).decode()
        for path, blob in filler.blobs.items():
            for spelling in spellings(blob):
                assert spelling not in text, f"{operation}: blob {path} leaked"
        for path, secret in filler.secrets.items():
            assert secret not in text, f"{operation}: sensitive member {path} leaked"


def _member_names(kind_test: Any) -> set[str]:
    """Names of members (at any depth, any operation, request or response) matching a test."""
    names: set[str] = set()

    def visit(shape: botocore.model.Shape, seen: frozenset[str]) -> None:
        if shape.name in seen:
            return
        seen = seen | {shape.name}
        if isinstance(shape, botocore.model.StructureShape):
            for name, member in shape.members.items():
                if kind_test(member):
                    names.add(name)
                visit(member, seen)
        elif isinstance(shape, botocore.model.ListShape):
            visit(shape.member, seen)
        elif isinstance(shape, botocore.model.MapShape):
            visit(shape.value, seen)

    for operation in OPERATIONS:
        op = MODEL.operation_model(operation)
        for shape in (op.input_shape, op.output_shape):
            if shape is not None:
                visit(shape, frozenset())
    return names


def test_no_blob_or_sensitive_member_is_allow_listed() -> None:
    blob_or_sensitive = _member_names(
        lambda s: s.type_name == "blob" or bool(s.metadata.get("sensitive")))
    assert {"Plaintext", "CiphertextBlob", "KeyStorePassword", "RawSecretAccessKey",
            "Message", "Signature", "Mac", "EncryptedKeyMaterial", "ImportToken",
            "AttestationDocument", "SharedSecret"} <= blob_or_sensitive
    assert not blob_or_sensitive & set(REQUEST_MEMBERS)
    assert not blob_or_sensitive & set(RESPONSE_MEMBERS)


def test_the_allow_list_is_not_vacuous() -> None:
    # The same filler's plain strings do show up, so the leak test above is meaningful.
    built, _ = events_for("Encrypt")
    text = json.dumps(built[0].to_dict())
    assert "marker-Encrypt.in.KeyId" in text
    assert "mapkey-Encrypt.in.EncryptionContext" in text
