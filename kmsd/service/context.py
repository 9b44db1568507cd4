"""Who is calling and about what: the per-request context handed to the service layer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Caller:
    access_key_id: str
    principal_arn: str
    account_id: str


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    region: str
    caller: Caller
    source_ip: str
    user_agent: str
    secure_transport: bool = False
    # (key id, key epoch) of every key-bound allow: re-checked when the audit record commits.
    decisions: list[tuple[str, int]] = field(default_factory=list)
    # (operation, key id) of the same allows, to re-decide a revoked request.
    authorized: list[tuple[str, str]] = field(default_factory=list)
