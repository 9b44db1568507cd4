"""Audit records of a domain-key rotation, CloudTrail-shaped like every other record.

One event name, `RotateDomainKey`, with the step in additionalEventData:
`requested` (by an operator through the admin API: their identity is the
userIdentity), then `begun`, `activated`, `abandoned` and `retired` (by the
leader: an AwsServiceEvent). Each names the generation and its check value,
a public fingerprint of the key; no key material ever appears.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

EVENT_NAME = "RotateDomainKey"
REQUESTED = "requested"
BEGUN = "begun"
ACTIVATED = "activated"
ABANDONED = "abandoned"
RETIRED = "retired"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def domain_event(step: str, generation: int | None, check: str | None, region: str,
                 account_id: str, user_identity: dict[str, Any] | None = None,
                 request_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"step": step}
    if generation is not None:
        data["generation"] = generation
    if check is not None:
        data["checkValue"] = check
    return {
        "eventVersion": "1.08", "eventTime": _now(), "eventSource": "kms.amazonaws.com",
        "eventName": EVENT_NAME, "awsRegion": region,
        "eventType": "AwsApiCall" if user_identity else "AwsServiceEvent",
        "eventID": str(uuid.uuid4()), "requestID": request_id or str(uuid.uuid4()),
        "readOnly": False, "managementEvent": True, "recipientAccountId": account_id,
        "eventCategory": "Management",
        "userIdentity": user_identity or {"type": "AWSService",
                                          "invokedBy": "kms.amazonaws.com"},
        "additionalEventData": data,
    }
