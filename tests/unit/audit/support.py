"""Shared builders for the audit tests: events for a few operations, chained records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kmsd.audit.chain import AuditChain, AuditEntry, ChainedRecord
from kmsd.audit.record import AuditEvent, build_event

ACCOUNT = "111122223333"
REGION = "us-west-2"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY_ID}"
OTHER_KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/0987dcba-09fe-87dc-65ba-ab0987654321"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/Alice"
# 2022-11-24T18:57:43Z, the time of FACTS.md §A.12's example, plus a fraction to truncate.
EVENT_TIME = 1669316263.75


def event(operation: str, params: Mapping[str, Any], response: Mapping[str, Any] | None = None,
          *, error_code: str | None = None, error_message: str | None = None,
          key_arns: Sequence[str] = (KEY_ARN,), event_time: float = EVENT_TIME,
          request_id: str = "f3423043-63bc-11e4-bc2b-4198b6150d5c",
          event_id: str = "91235988-eb87-476a-ac2c-0cdc244e6dca",
          principal_arn: str = ALICE) -> AuditEvent:
    return build_event(
        operation=operation, params=params, response=response, error_code=error_code,
        error_message=error_message, principal_arn=principal_arn, account_id=ACCOUNT,
        access_key_id="EXAMPLE_KEY_ID", region=REGION, source_ip="192.0.2.0",
        user_agent="Boto3/1.40.0 md/Botocore#1.40.0", request_id=request_id,
        event_id=event_id, event_time=event_time, key_arns=key_arns)


def sample_events(count: int) -> list[dict[str, Any]]:
    """`count` varied event dicts: crypto calls, management calls, failures, non-ASCII."""
    shapes = [
        ("Decrypt", {"CiphertextBlob": b"\x01ct", "EncryptionContext": {"Dept": "Eng"}}, None,
         None),
        ("Encrypt", {"KeyId": "alias/app", "Plaintext": b"pt",
                     "EncryptionContext": {"caf\u00e9": "cr\u00e8me \U0001f511"}}, None, None),
        ("GenerateDataKey", {"KeyId": KEY_ID, "KeySpec": "AES_256"}, None, None),
        ("DisableKey", {"KeyId": KEY_ID}, {}, None),
        ("Decrypt", {"CiphertextBlob": b"\x02"}, None, "IncorrectKeyException"),
        ("CreateAlias", {"AliasName": "alias/x\ty", "TargetKeyId": KEY_ID}, {}, None),
    ]
    out = []
    for i in range(count):
        op, params, response, error = shapes[i % len(shapes)]
        out.append(event(op, params, response, error_code=error,
                         error_message="The key cannot decrypt" if error else None,
                         event_time=EVENT_TIME + 61 * i, request_id=f"req-{i}",
                         event_id=f"evt-{i}").to_dict())
    return out


def chained(count: int, node: str = "node-a") -> tuple[AuditChain, list[ChainedRecord]]:
    chain = AuditChain()
    entries = [AuditEntry.of(e, node, revoked=(i % 5 == 4))
               for i, e in enumerate(sample_events(count))]
    records: list[ChainedRecord] = []
    for start in range(0, count, 4):  # batches, as group commit makes them
        records += chain.append(entries[start:start + 4])
    return chain, records
