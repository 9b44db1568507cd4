#!/usr/bin/env python3
"""CPU cost of building one audit record, as KmsProtocol._record builds it per request.

Times the whole build path for a typical Decrypt -- request id and event id, the clock read,
the event's canonical bytes (`encode_event`, or in older checkouts `build_event`, the event
dict and `AuditEntry.of`) -- and each step alone, with timeit: several repeats, the minimum
kept (the machine is shared; the minimum is the run least disturbed). Prints µs per record.
Runs against whichever kmsd is on PYTHONPATH, so the same script measures a checkout before
and after a change:

    PYTHONPATH=. .venv/bin/python bench/audit_record_cost.py
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/audit_record_cost.py

For a noise-free comparison, count instructions instead of time: `--loops N` only runs the
path N times (no timing), so under valgrind

    valgrind --tool=cachegrind --cache-sim=no python bench/audit_record_cost.py --loops 0
    valgrind --tool=cachegrind --cache-sim=no python bench/audit_record_cost.py --loops 5000

the difference of the two instruction totals divided by 5000 is the instructions per record.
"""

from __future__ import annotations

import argparse
import time
import timeit
import uuid
from collections.abc import Callable
from typing import Any

from kmsd.audit import record as audit_record
from kmsd.audit.chain import AuditEntry
from kmsd.audit.record import build_event, format_event_time

try:  # cheap ids, where the checkout has them
    from kmsd.ids import new_uuid
except ImportError:
    def new_uuid() -> str:
        return str(uuid.uuid4())

# _record encodes the event directly where the checkout can (encode_event), else it builds the
# event, its dict, and AuditEntry.of.
ENCODE_EVENT = getattr(audit_record, "encode_event", None)

ACCOUNT = "111122223333"
REGION = "us-west-2"
KEY_ARN = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
NODE = "node-1"
# What the validator hands a Decrypt handler, and what the handler returns.
PARAMS: dict[str, Any] = {"CiphertextBlob": b"\x01\x02\x03" * 60,
                          "EncryptionContext": {"Department": "Engineering",
                                                "Project": "Alpha"}}
RESPONSE: dict[str, Any] = {"KeyId": KEY_ARN, "Plaintext": b"p" * 32,
                            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}


def arguments(request_id: str, event_id: str, event_time: float) -> dict[str, Any]:
    return dict(
        operation="Decrypt", params=PARAMS, response=RESPONSE, error_code=None,
        error_message=None, principal_arn=f"arn:aws:iam::{ACCOUNT}:user/Alice",
        account_id=ACCOUNT, access_key_id="AKIAIOSFODNN7EXAMPLE", region=REGION,
        source_ip="127.0.0.1", user_agent="Boto3/1.40.0 md/Botocore#1.40.0",
        request_id=request_id, event_id=event_id, event_time=event_time,
        key_arns=[KEY_ARN], recipient_account_id=ACCOUNT)


def event_bytes(request_id: str, event_id: str, event_time: float) -> bytes:
    if ENCODE_EVENT is not None:
        return ENCODE_EVENT(**arguments(request_id, event_id, event_time))[1]
    event = build_event(**arguments(request_id, event_id, event_time)).to_dict()
    return AuditEntry.of(event, NODE).event_bytes


def record() -> bytes:
    """What _record does before it hands the event bytes to the committer."""
    request_id = new_uuid()  # made in KmsProtocol.handle
    event_id, event_time = new_uuid(), time.time()
    return event_bytes(request_id, event_id, event_time)


def steps() -> dict[str, Callable[[], Any]]:
    now = time.time()
    event = build_event(**arguments("r", "e", now)).to_dict()
    return {
        "whole record (2 ids, clock, event bytes)": record,
        "  one id": new_uuid,
        "  format_event_time": lambda: format_event_time(now),
        "  event bytes (as _record makes them)": lambda: event_bytes("r", "e", now),
        "  for reference: build_event + to_dict": lambda: build_event(**arguments("r", "e",
                                                                                now)).to_dict(),
        "  for reference: AuditEntry.of(dict)": lambda: AuditEntry.of(event, NODE),
    }


def best_us(fn: Callable[[], Any], repeat: int, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--number", type=int, default=5000)
    parser.add_argument("--loops", type=int, default=None,
                        help="only run the whole path this many times (for valgrind)")
    args = parser.parse_args()
    if args.loops is not None:
        for _ in range(args.loops):
            record()
        return
    print(f"event: {len(record())} bytes")
    for name, fn in steps().items():
        fn()  # warm caches (format_event_time's, the id pool)
        print(f"{name:55s} {best_us(fn, args.repeat, args.number):8.2f} µs")


if __name__ == "__main__":
    main()
