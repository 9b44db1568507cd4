"""The authorizer's shortcuts: no condition keys gathered when no policy has a Condition,
and remembered verdicts that can never outlive the policies they were decided on."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from cluster.state import BackingKey, GrantRecord, KeyRecord, KmsState, PrincipalRecord
from kmsd.auth import authorizer as authorizer_module
from kmsd.auth.authorizer import Authorizer
from kmsd.auth.policy import PolicyKind, parse_policy
from kmsd.errors import AccessDeniedException
from kmsd.service.context import Caller, RequestContext
from kmsd.service.keys import default_key_policy

ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/{KEY_ID}"


def key_policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def statement(effect: str, principal: str, action: str = "kms:*",
              condition: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {"Effect": effect, "Principal": {"AWS": principal}, "Action": action, "Resource": "*"}
    if condition is not None:
        out["Condition"] = condition
    return out


def identity_policy(action: str = "kms:Decrypt") -> str:
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": action, "Resource": "*"}]})


def state_with(policy: str) -> KmsState:
    state = KmsState()
    state.keys[KEY_ID] = KeyRecord(
        key_id=KEY_ID, region="us-east-1", account_id=ACCOUNT, description="",
        key_usage="ENCRYPT_DECRYPT", key_spec="SYMMETRIC_DEFAULT", origin="AWS_KMS",
        policy=policy, tags=(), created_at=0.0, key_state="Enabled",
        backing_keys=(BackingKey(1, b"w", 0.0),), epoch=1)
    state.principals[ALICE] = PrincipalRecord(ALICE, ACCOUNT, "user", "alice", 0.0,
                                              (("use", identity_policy()),))
    return state


def ctx(principal: str = ROOT) -> RequestContext:
    return RequestContext("r", "us-east-1", Caller("AKID", principal, ACCOUNT), "10.0.0.1",
                          "test")


def set_policy(state: KmsState, policy: str) -> None:
    record = state.keys[KEY_ID]
    state.keys[KEY_ID] = dataclasses.replace(record, policy=policy, epoch=record.epoch + 1)


def check(authorizer: Authorizer, state: KmsState, principal: str = ROOT,
          operation: str = "Decrypt", params: dict[str, Any] | None = None) -> None:
    authorizer.check(ctx(principal), operation, state.keys[KEY_ID], params or {})


def test_policies_know_whether_they_have_a_condition() -> None:
    assert not parse_policy(default_key_policy(ACCOUNT)).conditional
    conditional = key_policy(statement("Allow", ROOT),
                             statement("Deny", ROOT, condition={"Bool": {"aws:SecureTransport":
                                                                         "false"}}))
    assert parse_policy(conditional).conditional
    assert not parse_policy(identity_policy(), PolicyKind.IDENTITY).conditional


def test_without_a_condition_the_condition_keys_are_not_gathered(monkeypatch) -> None:
    state = state_with(default_key_policy(ACCOUNT))
    authorizer = Authorizer(state)

    def gathered(*_args: Any) -> dict[str, Any]:
        raise AssertionError("condition keys gathered")
    monkeypatch.setattr(authorizer, "_conditions", gathered)
    check(authorizer, state)
    check(authorizer, state, ALICE)
    with pytest.raises(AccessDeniedException):
        check(authorizer, state, ALICE, "Encrypt")
    set_policy(state, key_policy(statement("Allow", ROOT, condition={
        "StringEquals": {"kms:EncryptionContext:tenant": "a"}})))
    with pytest.raises(AssertionError, match="condition keys gathered"):
        check(authorizer, state)


def test_a_condition_is_tested_on_every_request() -> None:
    state = state_with(key_policy(statement("Allow", ROOT, condition={
        "StringEquals": {"kms:EncryptionContext:tenant": "a"}})))
    authorizer = Authorizer(state)
    for tenant, allowed in (("a", True), ("b", False), ("a", True), ("b", False)):
        params = {"EncryptionContext": {"tenant": tenant}}
        if allowed:
            check(authorizer, state, params=params)
        else:
            with pytest.raises(AccessDeniedException):
                check(authorizer, state, params=params)


def test_a_remembered_verdict_is_decided_once(monkeypatch) -> None:
    state = state_with(default_key_policy(ACCOUNT))
    authorizer = Authorizer(state)
    calls = []
    real = authorizer_module.check_access
    monkeypatch.setattr(authorizer_module, "check_access",
                        lambda *args: calls.append(args) or real(*args))
    for _ in range(3):
        check(authorizer, state)
    check(authorizer, state, operation="Encrypt")
    check(authorizer, state, ALICE)
    assert len(calls) == 3


def test_a_changed_key_policy_is_obeyed_at_once() -> None:
    state = state_with(default_key_policy(ACCOUNT))
    authorizer = Authorizer(state)
    check(authorizer, state)
    set_policy(state, key_policy(statement("Allow", ROOT), statement("Deny", ROOT,
                                                                     "kms:Decrypt")))
    with pytest.raises(AccessDeniedException, match="with an explicit deny in a "
                                                    "resource-based policy"):
        check(authorizer, state)
    set_policy(state, default_key_policy(ACCOUNT))
    check(authorizer, state)


def test_a_changed_identity_policy_is_obeyed_at_once() -> None:
    state = state_with(default_key_policy(ACCOUNT))
    authorizer = Authorizer(state)
    check(authorizer, state, ALICE)
    state.principals[ALICE] = dataclasses.replace(state.principals[ALICE], policies=())
    with pytest.raises(AccessDeniedException) as denied:
        check(authorizer, state, ALICE)
    assert denied.value.message == (
        f"User: {ALICE} is not authorized to perform: kms:Decrypt on resource: {ARN} "
        "because no identity-based policy allows the kms:Decrypt action")
    state.principals[ALICE] = dataclasses.replace(
        state.principals[ALICE], policies=(("use", identity_policy("kms:*")),))
    check(authorizer, state, ALICE)


def test_a_remembered_refusal_still_lets_a_grant_allow() -> None:
    state = state_with(default_key_policy(ACCOUNT))
    state.principals[ALICE] = dataclasses.replace(state.principals[ALICE], policies=())
    authorizer = Authorizer(state)
    with pytest.raises(AccessDeniedException):
        check(authorizer, state, ALICE)
    state.grants["g"] = GrantRecord("g", "", KEY_ID, "", ALICE, "", ("Decrypt",), None, None,
                                    ACCOUNT, 0.0)
    context = ctx(ALICE)
    authorizer.check(context, "Decrypt", state.keys[KEY_ID], {})
    assert context.decisions == [(KEY_ID, 1)]
    del state.grants["g"]
    with pytest.raises(AccessDeniedException):
        check(authorizer, state, ALICE)


def test_remembered_verdicts_are_bounded() -> None:
    state = state_with(default_key_policy(ACCOUNT))
    authorizer = Authorizer(state, cache_size=4)
    for n in range(10):
        set_policy(state, key_policy(statement("Allow", ROOT), {**statement(
            "Allow", ROOT), "Sid": f"s{n}"}))
        check(authorizer, state)
    assert len(authorizer._verdicts) <= 4
