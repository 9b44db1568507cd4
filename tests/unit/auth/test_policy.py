"""The IAM policy evaluator against AWS's documented behaviour.

Examples come from the AWS docs cited in kmsd/auth/policy.py and policy_conditions.py;
each case names its source: OPS (IAM condition operators page), SETS (multi-value
conditions), KMS-COND (AWS KMS condition keys), KMS-DEFAULT, KMS-XACCOUNT, KMS-PUT,
IAM-NOTPRIN, IAM-DENIED.
"""

from __future__ import annotations

import fnmatch
import json
from datetime import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsd.auth.policy import (
    INVALID_PRINCIPALS,
    LOCKOUT_MESSAGE,
    Decision,
    DenialReason,
    MalformedPolicyDocumentException,
    Policy,
    PolicyKind,
    RequestFacts,
    access_denied_message,
    authorize,
    check_access,
    evaluate_key_policy,
    evaluate_statements,
    lockout_safety_check,
    parse_policy,
)
from kmsd.auth.policy_conditions import wildcard_match
from kmsd.errors import KmsError, LimitExceededException

ACCOUNT, OTHER = "111122223333", "444455556666"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ALICE = f"arn:aws:iam::{ACCOUNT}:user/alice"
BOB = f"arn:aws:iam::{ACCOUNT}:user/bob"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/EncryptionApp"
SESSION = f"arn:aws:sts::{ACCOUNT}:assumed-role/EncryptionApp/session-1"
EXTERNAL = f"arn:aws:iam::{OTHER}:user/carol"
KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
OTHER_KEY = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/0987dcba-09fe-87dc-65ba-ab0987654321"
DEFAULT_POLICY = json.dumps({
    "Version": "2012-10-17", "Id": "key-default-1",
    "Statement": [{"Sid": "Enable IAM User Permissions", "Effect": "Allow",
                   "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"}]})
MISSING = object()


def account_of(arn: str) -> str:
    return arn.split(":")[4]


def facts(principal: str = ALICE, action: str = "kms:Decrypt", resource: str = KEY,
          **context: Any) -> RequestFacts:
    return RequestFacts(principal, account_of(principal), action, resource, context)


def key_policy(*statements: dict) -> Policy:
    return parse_policy(json.dumps({"Version": "2012-10-17", "Statement": list(statements)}))


def identity_policy(*statements: dict) -> Policy:
    doc = {"Version": "2012-10-17", "Statement": list(statements)}
    return parse_policy(json.dumps(doc), PolicyKind.IDENTITY)


def allow(principal: Any = None, action: Any = "kms:Decrypt", **extra: Any) -> dict:
    stmt = {"Effect": "Allow", "Principal": principal or {"AWS": ALICE}, "Action": action,
            "Resource": "*"}
    return {**stmt, **extra}


def deny(principal: Any = "*", action: Any = "kms:Decrypt", **extra: Any) -> dict:
    return {**allow(principal, action, **extra), "Effect": "Deny"}


def holds(operator: str, key: str, value: Any, actual: Any) -> bool:
    policy = key_policy(allow(Condition={operator: {key: value}}))
    context = {} if actual is MISSING else {key.upper(): actual}
    return evaluate_statements(policy, facts(**context)) is Decision.ALLOW


def outcome(key: Policy, identity: list[Policy], request: RequestFacts) -> tuple:
    result = check_access(key, identity, request)
    return result.decision, result.reason


# --- condition operators ------------------------------------------------------------------

EC_APP = "kms:EncryptionContext:AppName"
CASES = [
    # String (OPS; KMS-COND kms:EncryptionContext:context-key examples)
    ("StringEquals", EC_APP, "ExampleApp", "ExampleApp", True),
    ("StringEquals", EC_APP, "ExampleApp", "exampleapp", False),
    ("StringEquals", EC_APP, "ExampleApp", MISSING, False),
    ("StringEquals", "kms:EncryptionContext:Stage", ["Restricted", "Production"],
     "Production", True),                                       # values are ORed
    ("StringNotEquals", "kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_256",
     True),
    ("StringNotEquals", "kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", "SYMMETRIC_DEFAULT",
     False),
    ("StringNotEquals", "kms:EncryptionAlgorithm", "SYMMETRIC_DEFAULT", MISSING, True),
    ("StringEqualsIgnoreCase", EC_APP, "exampleapp", "ExampleApp", True),
    ("StringNotEqualsIgnoreCase", EC_APP, "EXAMPLEAPP", "ExampleApp", False),
    ("StringNotEqualsIgnoreCase", EC_APP, "EXAMPLEAPP", "Other", True),
    ("StringLike", "kms:DataKeyPairSpec", "RSA*", "RSA_2048", True),
    ("StringLike", "kms:DataKeyPairSpec", "RSA*", "ECC_NIST_P256", False),
    ("StringLike", "kms:KeySpec", "?SA_2048", "RSA_2048", True),
    ("StringNotLike", "kms:DataKeyPairSpec", "RSA*", "ECC_NIST_P256", True),
    ("StringNotLike", "kms:DataKeyPairSpec", "RSA*", MISSING, True),
    ("StringEquals", "kms:CallerAccount", 111122223333, "111122223333", True),
    # Numeric (OPS: NumericLessThanEquals s3:max-keys "10")
    ("NumericLessThanEquals", "kms:ScheduleKeyDeletionPendingWindowInDays", "10", 7, True),
    ("NumericLessThanEquals", "kms:ScheduleKeyDeletionPendingWindowInDays", "10", 30, False),
    ("NumericEquals", "kms:RotationPeriodInDays", 365, "365", True),
    ("NumericNotEquals", "kms:RotationPeriodInDays", 365, 90, True),
    ("NumericLessThan", "kms:RotationPeriodInDays", 10, 10, False),
    ("NumericGreaterThan", "kms:RotationPeriodInDays", "7.5", 30, True),
    ("NumericGreaterThanEquals", "kms:RotationPeriodInDays", 7, 7, True),
    ("NumericEquals", "kms:RotationPeriodInDays", 7, "seven", False),
    ("NumericEquals", "kms:RotationPeriodInDays", 7, MISSING, False),
    # Date (OPS: DateGreaterThan aws:TokenIssueTime "2020-01-01T00:00:01Z")
    ("DateGreaterThan", "aws:CurrentTime", "2020-01-01T00:00:01Z", datetime(2021, 1, 1), True),
    ("DateGreaterThan", "aws:CurrentTime", "2020-01-01T00:00:01Z", datetime(2019, 1, 1), False),
    ("DateLessThan", "aws:CurrentTime", "1735689600", datetime(2024, 6, 1), True),  # epoch
    ("DateLessThan", "aws:CurrentTime", 1735689600, "2025-06-01T00:00:00Z", False),
    ("DateEquals", "aws:CurrentTime", "2020-01-01", datetime(2020, 1, 1), True),
    ("DateNotEquals", "aws:CurrentTime", "2020-01-01", datetime(2020, 1, 2), True),
    ("DateLessThanEquals", "aws:CurrentTime", "2020-01-01T00:00:00+00:00",
     datetime(2020, 1, 1), True),
    ("DateGreaterThanEquals", "aws:CurrentTime", "2020-01-02", datetime(2020, 1, 1), False),
    # Bool (OPS: Bool aws:SecureTransport "false"; KMS-COND kms:GrantIsForAWSResource)
    ("Bool", "aws:SecureTransport", "false", False, True),
    ("Bool", "aws:SecureTransport", "false", True, False),
    ("Bool", "kms:GrantIsForAWSResource", True, "true", True),
    ("Bool", "kms:GrantIsForAWSResource", True, MISSING, False),
    # Binary (OPS example value)
    ("BinaryEquals", "aws:Blob", "QmluYXJ5VmFsdWVJbkJhc2U2NA==", b"BinaryValueInBase64", True),
    ("BinaryEquals", "aws:Blob", "QmluYXJ5VmFsdWVJbkJhc2U2NA==", b"other", False),
    # IP address (OPS: 203.0.113.0/24 and 2001:DB8:1234:5678::/64; bare address is /32)
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", "203.0.113.7", True),
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", "198.51.100.1", False),
    ("IpAddress", "aws:SourceIp", "2001:DB8:1234:5678::/64", "2001:db8:1234:5678::1", True),
    ("IpAddress", "aws:SourceIp", "203.0.113.7", "203.0.113.8", False),
    ("IpAddress", "aws:SourceIp", "203.0.113.0/24", "not-an-ip", False),
    ("NotIpAddress", "aws:SourceIp", "203.0.113.0/24", "198.51.100.1", True),
    ("NotIpAddress", "aws:SourceIp", "203.0.113.0/24", "203.0.113.9", False),
    # ARN (OPS: ArnLike matches component by component; StringLike does not)
    ("ArnLike", "aws:PrincipalArn", f"arn:aws:iam::{ACCOUNT}:role/*", ROLE, True),
    ("ArnLike", "aws:SourceArn", "arn:aws:someservice:*:111122223333:finance/*",
     "arn:aws:someservice:us-east-2:999999999999:store/abc:111122223333:finance/document.txt",
     False),
    ("StringLike", "aws:SourceArn", "arn:aws:someservice:*:111122223333:finance/*",
     "arn:aws:someservice:us-east-2:999999999999:store/abc:111122223333:finance/document.txt",
     True),
    ("ArnEquals", "aws:PrincipalArn", ROLE, ROLE, True),
    ("ArnNotEquals", "aws:PrincipalArn", ROLE, BOB, True),
    ("ArnNotLike", "aws:PrincipalArn", f"arn:aws:iam::{ACCOUNT}:user/*", BOB, False),
    # ...IfExists (OPS)
    ("StringEqualsIfExists", EC_APP, "ExampleApp", MISSING, True),
    ("StringEqualsIfExists", EC_APP, "ExampleApp", "Other", False),
    ("StringNotEqualsIfExists", EC_APP, "ExampleApp", MISSING, True),
    ("NumericLessThanIfExists", "kms:RotationPeriodInDays", 10, 20, False),
    ("IpAddressIfExists", "aws:SourceIp", "10.0.0.0/8", MISSING, True),
    # Null (OPS; KMS-COND kms:EncryptionContextKeys and kms:BypassPolicyLockoutSafetyCheck)
    ("Null", "kms:EncryptionContextKeys", "false", ["AppName"], True),
    ("Null", "kms:EncryptionContextKeys", False, MISSING, False),
    ("Null", "kms:EncryptionContextKeys", "false", [], False),
    ("Null", "kms:BypassPolicyLockoutSafetyCheck", True, MISSING, True),
    ("Null", "kms:BypassPolicyLockoutSafetyCheck", "true", False, False),
    # Set qualifiers (SETS; KMS-COND kms:EncryptionContextKeys)
    ("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName",
     ["AppName", "Project"], True),
    ("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName", ["Project"], False),
    ("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName", MISSING, False),
    ("ForAnyValue:StringEquals", "kms:EncryptionContextKeys", "AppName", [], False),
    ("ForAllValues:StringEquals", "kms:EncryptionContextKeys", ["Department", "Project"],
     ["Department"], True),
    ("ForAllValues:StringEquals", "kms:EncryptionContextKeys", ["Department", "Project"],
     ["Department", "Stage"], False),
    ("ForAllValues:StringEquals", "kms:EncryptionContextKeys", ["Department"], MISSING, True),
    ("ForAllValues:StringEquals", "kms:EncryptionContextKeys", ["Department"], [], True),
    # SETS table: ForAllValues:StringNotLike aws:TagKeys "key1*"
    ("ForAllValues:StringNotLike", "aws:TagKeys", "key1*", ["key1:legal"], False),
    ("ForAllValues:StringNotLike", "aws:TagKeys", "key1*", ["key1:hr", "key1:personnel"],
     False),
    ("ForAllValues:StringNotLike", "aws:TagKeys", "key1*", ["key2:audit"], True),
    ("ForAllValues:StringNotLike", "aws:TagKeys", "key1*", MISSING, True),
    ("ForAnyValue:StringLike", "kms:ResourceAliases", "alias/finance-*",
     ["alias/hr", "alias/finance-key"], True),
    ("ForAnyValue:StringEqualsIfExists", "kms:GrantOperations", "Decrypt", MISSING, True),
    ("forallvalues:stringequals", "kms:GrantOperations", ["Decrypt", "Encrypt"],
     ["Encrypt"], True),                                        # operator names: any case
]


@pytest.mark.parametrize(("operator", "key", "value", "actual", "expected"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_condition_operator(operator: str, key: str, value: Any, actual: Any,
                            expected: bool) -> None:
    assert holds(operator, key, value, actual) is expected


def test_condition_key_names_ignore_case_including_the_context_key_part() -> None:
    # KMS-COND "Case sensitivity of the encryption context condition": the whole condition
    # key, prefix and context-key, is not case sensitive; the value follows the operator.
    policy = key_policy(allow(Condition={"StringEquals": {"kms:EncryptionContext:Appname":
                                                          "ExampleApp"}}))
    assert evaluate_statements(
        policy, facts(**{"kms:encryptioncontext:APPNAME": "ExampleApp"})) is Decision.ALLOW
    assert evaluate_statements(
        policy, facts(**{"kms:EncryptionContext:AppName": "exampleapp"})) is Decision.NO_MATCH


def test_context_values_and_key_collisions() -> None:
    # Encryption context keys that differ only in case are both legal in KMS; a condition
    # key names both of them, so neither may hide the other from a Deny.
    policy = key_policy(allow(), deny(Condition={"StringEquals": {
        "kms:EncryptionContext:tenant": "b"}}))
    both = {"kms:EncryptionContext:Tenant": "a", "kms:EncryptionContext:tenant": "b"}
    assert evaluate_statements(policy, facts(**both)) is Decision.EXPLICIT_DENY
    # None is "not in the request"; booleans and datetimes compare as their text forms.
    assert holds("StringNotEquals", EC_APP, "x", None) is True
    assert holds("StringEquals", "aws:SecureTransport", "true", True) is True
    assert holds("StringLike", "aws:CurrentTime", "2026-01-01T*Z", datetime(2026, 1, 1))


def test_keys_and_operators_are_anded() -> None:
    # KMS-COND: require Department=IT and Project=Alpha; the set operator limits the keys.
    policy = key_policy(allow(Condition={
        "StringEquals": {"kms:EncryptionContext:Department": "IT",
                         "kms:EncryptionContext:Project": "Alpha"},
        "ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["Department", "Project"]}}))
    both = {"kms:EncryptionContext:Department": "IT", "kms:EncryptionContext:Project": "Alpha",
            "kms:EncryptionContextKeys": ["Department", "Project"]}
    assert evaluate_statements(policy, facts(**both)) is Decision.ALLOW
    one = {"kms:EncryptionContext:Department": "IT", "kms:EncryptionContextKeys": ["Department"]}
    assert evaluate_statements(policy, facts(**one)) is Decision.NO_MATCH
    extra = {**both, "kms:EncryptionContext:Stage": "Test",
             "kms:EncryptionContextKeys": ["Department", "Project", "Stage"]}
    assert evaluate_statements(policy, facts(**extra)) is Decision.NO_MATCH
    assert evaluate_statements(policy, facts()) is Decision.NO_MATCH


def test_policy_variables_are_not_substituted_and_fail_closed() -> None:
    cond = {"StringEquals": {"kms:EncryptionContext:user": "${aws:username}"}}
    literal = facts(**{"kms:EncryptionContext:user": "${aws:username}"})
    assert evaluate_statements(key_policy(allow(Condition=cond)), literal) is Decision.NO_MATCH
    assert evaluate_statements(key_policy(deny(Condition=cond)), facts()) \
        is Decision.EXPLICIT_DENY
    # IAM-VERSION: under 2008-10-17 "${...}" is literal text.
    old = parse_policy(json.dumps({"Version": "2008-10-17",
                                   "Statement": allow(Condition=cond)}))
    assert evaluate_statements(old, literal) is Decision.ALLOW
    assert evaluate_statements(key_policy(allow(Resource=f"{KEY[:-5]}${{aws:username}}")),
                               facts()) is Decision.NO_MATCH
    not_resource = {"Effect": "Deny", "Principal": "*", "Action": "kms:*",
                    "NotResource": "arn:aws:kms:${aws:region}:*"}
    assert evaluate_statements(key_policy(not_resource), facts()) is Decision.EXPLICIT_DENY


# --- principals, actions, resources --------------------------------------------------------

@pytest.mark.parametrize("principal", ["*", {"AWS": "*"}, {"AWS": ["*"]}])
def test_everyone(principal: Any) -> None:
    policy = key_policy(allow(principal))
    for who in (ALICE, ROOT, EXTERNAL, SESSION):
        assert evaluate_key_policy(policy, facts(who)).allows_directly


@pytest.mark.parametrize("principal", [ACCOUNT, ROOT])
def test_account_principal_delegates(principal: str) -> None:
    # KMS-DEFAULT: the account principal gives no user permission, it enables IAM policies.
    policy = key_policy(allow({"AWS": principal}))
    verdict = evaluate_key_policy(policy, facts(BOB))
    assert (verdict.allows_directly, verdict.delegates_to_account) == (False, True)
    assert verdict.decision is Decision.NO_MATCH
    assert evaluate_statements(policy, facts(BOB)) is Decision.ALLOW   # plain IAM reading
    assert evaluate_statements(policy, facts(EXTERNAL)) is Decision.NO_MATCH


def test_user_and_role_principals_are_exact() -> None:
    policy = key_policy(allow({"AWS": [ALICE, ROLE]}))
    assert evaluate_key_policy(policy, facts(ALICE)).allows_directly
    assert evaluate_key_policy(policy, facts(SESSION)).allows_directly   # session of ROLE
    assert evaluate_statements(policy, facts(BOB)) is Decision.NO_MATCH
    # IAM-PRINCIPAL: the user name part of the ARN is case sensitive.
    alice_upper = f"arn:aws:iam::{ACCOUNT}:user/Alice"
    assert evaluate_statements(key_policy(allow({"AWS": alice_upper})), facts(ALICE)) \
        is Decision.NO_MATCH


def test_not_principal_with_deny() -> None:
    # IAM-NOTPRIN example: everyone except Bob (listed with his account) is denied.
    policy = key_policy({"Effect": "Deny", "NotPrincipal": {"AWS": [BOB, ROOT]},
                         "Action": "kms:*", "Resource": "*"}, allow({"AWS": [ALICE, BOB]}))
    assert evaluate_statements(policy, facts(BOB)) is Decision.ALLOW
    assert evaluate_statements(policy, facts(ALICE)) is Decision.EXPLICIT_DENY
    assert evaluate_statements(policy, facts(ROOT)) is Decision.NO_MATCH
    assert evaluate_statements(policy, facts(EXTERNAL)) is Decision.EXPLICIT_DENY


@pytest.mark.parametrize(("action", "requested", "expected"), [
    ("kms:*", "kms:Decrypt", True), ("*", "kms:Decrypt", True),
    ("kms:ReEncrypt*", "kms:ReEncryptFrom", True), ("kms:?ecrypt", "kms:Decrypt", True),
    ("KMS:decrypt", "kms:Decrypt", True),            # IAM-ACTION: case insensitive
    ("kms:Encrypt", "kms:Decrypt", False), ("kms:Decrypt*", "kms:Decrypt", True),
    (["kms:Encrypt", "kms:Decrypt"], "kms:Decrypt", True),
])
def test_action_matching(action: Any, requested: str, expected: bool) -> None:
    decision = evaluate_statements(key_policy(allow(action=action)), facts(action=requested))
    assert (decision is Decision.ALLOW) is expected


def test_not_action() -> None:
    policy = key_policy({"Effect": "Allow", "Principal": {"AWS": ALICE},
                         "NotAction": ["kms:Decrypt", "kms:Schedule*"], "Resource": "*"})
    assert evaluate_statements(policy, facts(action="kms:Encrypt")) is Decision.ALLOW
    assert evaluate_statements(policy, facts(action="kms:Decrypt")) is Decision.NO_MATCH
    assert evaluate_statements(policy, facts(action="kms:ScheduleKeyDeletion")) \
        is Decision.NO_MATCH


@pytest.mark.parametrize(("resource", "expected"), [
    ("*", True), (KEY, True), (OTHER_KEY, False),
    (f"arn:aws:kms:*:{ACCOUNT}:key/*", True),
    (KEY.replace("abcd", "ABCD"), False),             # ARNs are case sensitive
    ([OTHER_KEY, f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-*"], True),
])
def test_resource_matching(resource: Any, expected: bool) -> None:
    decision = evaluate_statements(key_policy(allow(Resource=resource)), facts())
    assert (decision is Decision.ALLOW) is expected


def test_not_resource() -> None:
    stmt = {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": "kms:*",
            "NotResource": OTHER_KEY}
    assert evaluate_statements(key_policy(stmt), facts()) is Decision.ALLOW
    assert evaluate_statements(key_policy(stmt), facts(resource=OTHER_KEY)) \
        is Decision.NO_MATCH


@pytest.mark.parametrize("missing", ["Action", "Resource"])
def test_key_policy_statement_missing_action_or_resource_has_no_effect(missing: str) -> None:
    # KMS-PUT: such a statement "has no effect" yet the PutKeyPolicy request succeeds.
    stmt = allow()
    del stmt[missing]
    assert evaluate_statements(key_policy(stmt), facts()) is Decision.NO_MATCH


def test_single_statement_object_and_default_version() -> None:
    policy = parse_policy(json.dumps({"Statement": allow()}))
    assert policy.version == "2008-10-17"
    assert evaluate_statements(policy, facts()) is Decision.ALLOW


# --- the KMS authorization rule -----------------------------------------------------------

ALLOW_DECRYPT = {"Effect": "Allow", "Action": "kms:Decrypt", "Resource": KEY}


def test_default_key_policy_delegates_to_identity_policies() -> None:
    key = parse_policy(DEFAULT_POLICY)
    assert outcome(key, [], facts()) == \
        (Decision.NO_MATCH, DenialReason.NO_IDENTITY_POLICY_ALLOWS)
    assert authorize(key, [identity_policy(ALLOW_DECRYPT)], facts()) is Decision.ALLOW
    only_encrypt = identity_policy({**ALLOW_DECRYPT, "Action": "kms:Encrypt"})
    assert authorize(key, [only_encrypt], facts()) is Decision.NO_MATCH
    other_key = identity_policy({**ALLOW_DECRYPT, "Resource": OTHER_KEY})
    assert authorize(key, [other_key], facts()) is Decision.NO_MATCH
    # The account's root user has no identity policies and needs none.
    assert authorize(key, [], facts(ROOT)) is Decision.ALLOW


def test_identity_policies_need_the_key_policy_to_enable_them() -> None:
    # KMS-DEFAULT: "Without this permission, IAM policies that allow access to the key are
    # ineffective".
    key = key_policy(allow({"AWS": BOB}))
    result = check_access(key, [identity_policy(ALLOW_DECRYPT)], facts())
    assert (result.decision, result.reason) == \
        (Decision.NO_MATCH, DenialReason.NO_KEY_POLICY_ALLOWS)
    assert authorize(key, [], facts(ROOT)) is Decision.NO_MATCH   # root gets no bypass


def test_direct_key_policy_allow_needs_no_identity_policy() -> None:
    key = key_policy(allow())
    assert evaluate_key_policy(key, facts()).decision is Decision.ALLOW
    assert authorize(key, [], facts()) is Decision.ALLOW


def test_explicit_denies_win_from_either_side() -> None:
    key = key_policy(allow({"AWS": ROOT}, "kms:*"), allow())
    identity_deny = identity_policy({**ALLOW_DECRYPT, "Effect": "Deny"})
    assert outcome(key, [identity_policy(ALLOW_DECRYPT), identity_deny], facts()) == \
        (Decision.EXPLICIT_DENY, DenialReason.EXPLICIT_DENY_IN_IDENTITY_POLICY)
    # KMS-DEFAULT: an IAM Deny is effective even when the key policy does not enable IAM.
    assert authorize(key_policy(allow()), [identity_deny], facts()) is Decision.EXPLICIT_DENY
    key_deny = key_policy(allow({"AWS": ROOT}, "kms:*"), deny({"AWS": ALICE}))
    assert outcome(key_deny, [identity_policy(ALLOW_DECRYPT)], facts()) == \
        (Decision.EXPLICIT_DENY, DenialReason.EXPLICIT_DENY_IN_KEY_POLICY)


@pytest.mark.parametrize("principal", [f"arn:aws:iam::{OTHER}:root", EXTERNAL, "*"])
def test_cross_account_needs_both_policies(principal: str) -> None:
    # KMS-XACCOUNT: "Neither the key policy nor the IAM policy alone is sufficient".
    key = key_policy(allow(principal if principal == "*" else {"AWS": principal}))
    assert outcome(key, [], facts(EXTERNAL)) == \
        (Decision.NO_MATCH, DenialReason.NO_IDENTITY_POLICY_ALLOWS)
    assert authorize(key, [identity_policy(ALLOW_DECRYPT)], facts(EXTERNAL)) is Decision.ALLOW


def test_everyone_limited_by_caller_account() -> None:
    # KMS-COND kms:CallerAccount: Principal "*" with the condition covers the account.
    key = key_policy(allow({"AWS": "*"}, Condition={"StringEquals": {"kms:CallerAccount":
                                                                      ACCOUNT}}))
    assert authorize(key, [], facts(BOB)) is Decision.ALLOW
    assert check_access(key, [identity_policy(ALLOW_DECRYPT)], facts(EXTERNAL)).reason is \
        DenialReason.NO_KEY_POLICY_ALLOWS


@pytest.mark.parametrize(("reason", "ending"), [
    (DenialReason.NO_KEY_POLICY_ALLOWS,
     "because no resource-based policy allows the kms:Decrypt action"),
    (DenialReason.NO_IDENTITY_POLICY_ALLOWS,
     "because no identity-based policy allows the kms:Decrypt action"),
    (DenialReason.EXPLICIT_DENY_IN_KEY_POLICY, "with an explicit deny in a resource-based policy"),
    (DenialReason.EXPLICIT_DENY_IN_IDENTITY_POLICY,
     "with an explicit deny in an identity-based policy"),
])
def test_access_denied_message(reason: DenialReason, ending: str) -> None:
    # IAM-DENIED forms, as KMS returns them (e.g. aws-nitro-enclaves-sdk-c#157,
    # jbrt/ec2cryptomatic#26): "User: <arn> is not authorized to perform: <action> on
    # resource: <key arn> <context>".
    assert access_denied_message(facts(), reason) == (
        f"User: {ALICE} is not authorized to perform: kms:Decrypt on resource: {KEY} {ending}")


# --- lockout safety check -----------------------------------------------------------------

def test_lockout_safety_check() -> None:
    lockout_safety_check(parse_policy(DEFAULT_POLICY), ALICE, ACCOUNT)
    lockout_safety_check(key_policy(allow(action="kms:Put*")), ALICE, ACCOUNT)
    # KMS-COND kms:BypassPolicyLockoutSafetyCheck: Allow with Null ... true.
    lockout_safety_check(key_policy(allow(action="kms:PutKeyPolicy", Condition={
        "Null": {"kms:BypassPolicyLockoutSafetyCheck": True}})), ALICE, ACCOUNT)
    lockout_safety_check(key_policy(allow(action="kms:*", Resource=KEY)), ALICE, ACCOUNT,
                         key_arn=KEY)
    for locked_out in (key_policy(allow({"AWS": BOB}, "kms:*")),
                       key_policy(allow(action="kms:Decrypt")),
                       key_policy(allow(action="kms:*", Resource=KEY)),   # key_arn unknown
                       key_policy(allow({"AWS": ROOT}, "kms:*"), deny("*", "kms:Put*"))):
        with pytest.raises(MalformedPolicyDocumentException) as caught:
            lockout_safety_check(locked_out, ALICE, ACCOUNT)
        assert caught.value.message == LOCKOUT_MESSAGE
        assert caught.value.to_body()["__type"] == "MalformedPolicyDocumentException"


# --- malformed policies -------------------------------------------------------------------

def doc(statement: Any, **top: Any) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": statement, **top})


MALFORMED = [
    ("{not json", PolicyKind.KEY, "Policy is not valid JSON: Expecting property name"),
    ("[]", PolicyKind.KEY, "Policy must be a JSON object"),
    (json.dumps({"Version": "2012-10-17"}), PolicyKind.KEY, "Policy has no Statement element"),
    (doc([]), PolicyKind.KEY, "Statement must contain at least one statement"),
    (doc(allow(), Statment=[]), PolicyKind.KEY, "unknown top-level element(s): Statment"),
    (doc(allow(), Version="2012-10-18"), PolicyKind.KEY,
     'Version must be "2012-10-17" or "2008-10-17"'),
    (doc(["text"]), PolicyKind.KEY, "Statement 1 must be an object"),
    (doc({**allow(), "Effect": "Permit"}), PolicyKind.KEY,
     'Statement 1: Effect must be "Allow" or "Deny", not \'Permit\''),
    (doc([allow(), allow(NotAction="kms:Encrypt")]), PolicyKind.KEY,
     "Statement 2 has both Action and NotAction"),
    (doc({"Effect": "Allow", "Resource": "*"}), PolicyKind.IDENTITY,
     "Statement 1 has neither Action nor NotAction"),
    (doc({"Effect": "Allow", "Action": "kms:*"}), PolicyKind.IDENTITY,
     "Statement 1 has neither Resource nor NotResource"),
    (doc(allow(NotResource="*")), PolicyKind.KEY, "has both Resource and NotResource"),
    (doc({"Effect": "Allow", "Action": "kms:*", "Resource": "*"}), PolicyKind.KEY,
     "Statement 1 has neither Principal nor NotPrincipal"),
    (doc(allow(NotPrincipal="*")), PolicyKind.KEY, "has both Principal and NotPrincipal"),
    (doc(allow()), PolicyKind.IDENTITY, "an identity-based policy cannot specify a principal"),
    (doc(allow(Actions="kms:*")), PolicyKind.KEY, "unknown element(s): Actions"),
    (doc(allow(action="Decrypt")), PolicyKind.KEY, 'values must be "*" or "<service>:<action>"'),
    (doc(allow(action=[])), PolicyKind.KEY, "Action must be a non-empty string"),
    (doc(allow(action=None)), PolicyKind.KEY, "Action must not be null"),
    (doc(allow(Resource="key/1234")), PolicyKind.KEY, 'Resource values must be "*" or ARNs'),
    (doc(allow(Sid=7)), PolicyKind.KEY, "Sid must be a string"),
    (doc(allow(Condition={"StringEqualz": {"k": "v"}})), PolicyKind.KEY,
     "Unknown condition operator 'StringEqualz'"),
    (doc(allow(Condition={"ForSomeValues:StringEquals": {"k": "v"}})), PolicyKind.KEY,
     "Unknown condition set qualifier 'ForSomeValues'"),
    (doc(allow(Condition={"NullIfExists": {"k": "true"}})), PolicyKind.KEY,
     "Null condition operator cannot be used with IfExists"),
    (doc(allow(Condition=["StringEquals"])), PolicyKind.KEY,
     "Condition must be an object of condition operators"),
    (doc(allow(Condition={"StringEquals": "v"})), PolicyKind.KEY,
     "Condition operator 'StringEquals' must map context keys to values"),
    (doc(allow(Condition={"StringEquals": {"k": {"v": 1}}})), PolicyKind.KEY,
     "needs one or more string, number or boolean values"),
    (doc(allow(Condition={"NumericEquals": {"k": "ten"}})), PolicyKind.KEY,
     "Invalid value for condition operator 'NumericEquals' on 'k': 'ten'"),
    (doc(allow(Condition={"IpAddress": {"aws:SourceIp": "203.0.113.0/33"}})), PolicyKind.KEY,
     "Invalid value for condition operator 'IpAddress'"),
    (doc(allow(Condition={"DateLessThan": {"aws:CurrentTime": "yesterday"}})), PolicyKind.KEY,
     "Invalid value for condition operator 'DateLessThan'"),
    (doc(allow(Condition={"BinaryEquals": {"k": "not base64!"}})), PolicyKind.KEY,
     "Invalid value for condition operator 'BinaryEquals'"),
    (doc(allow(Condition={"Bool": {"aws:SecureTransport": "yes"}})), PolicyKind.KEY,
     "Invalid value for condition operator 'Bool'"),
]
BAD_PRINCIPALS = ["arn:aws:iam::111122223333:user/*", "arn:aws:iam::*:root", "alice",
                  "11112222333", {"AWS": []}, {"CanonicalUser": "79a59df900b949e55d96a1e6"},
                  {"AWS": ALICE.replace("alice", "al?ce")}, ALICE, {"Service": "*"}, None]


@pytest.mark.parametrize(("text", "kind", "message"), MALFORMED,
                         ids=[m[2][:40] for m in MALFORMED])
def test_malformed_policy(text: str, kind: PolicyKind, message: str) -> None:
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        parse_policy(text, kind)
    assert message in caught.value.message


@pytest.mark.parametrize("principal", BAD_PRINCIPALS)
def test_bad_principal(principal: Any) -> None:
    value = principal if isinstance(principal, dict | None) or principal == ALICE \
        else {"AWS": principal}
    with pytest.raises(MalformedPolicyDocumentException) as caught:
        parse_policy(doc({**allow(), "Principal": value}))
    assert caught.value.message in (INVALID_PRINCIPALS, "Statement 1: Principal must not be null")


def test_deeply_nested_json_is_malformed() -> None:
    with pytest.raises(MalformedPolicyDocumentException, match="nested too deeply"):
        parse_policy("[" * 100_000 + "]" * 100_000, PolicyKind.IDENTITY)


def test_key_policy_size_limit() -> None:
    # KMS-PUT: "If the key policy exceeds the length constraint, KMS returns a
    # LimitExceededException."
    padded = doc(allow(Sid="x" * 33000))
    with pytest.raises(LimitExceededException):
        parse_policy(padded)
    parse_policy(doc(allow(Sid="x" * 32000)))


# --- properties -----------------------------------------------------------------------------

PRINCIPALS = ["*", {"AWS": "*"}, {"AWS": ACCOUNT}, {"AWS": ROOT}, {"AWS": ALICE},
              {"AWS": [BOB, ROLE]}, {"AWS": f"arn:aws:iam::{OTHER}:root"}, {"AWS": EXTERNAL}]
ACTIONS = ["kms:*", "kms:Decrypt", "kms:Encrypt", "kms:Re*", "kms:?ecrypt", "*", "KMS:DECRYPT",
           "kms:PutKeyPolicy", "kms:Generate*"]
RESOURCES = ["*", KEY, OTHER_KEY, f"arn:aws:kms:*:{ACCOUNT}:key/*"]
CONDITIONS = [
    {"StringEquals": {"kms:EncryptionContext:tenant": "a"}},
    {"Bool": {"aws:SecureTransport": "true"}},
    {"ForAllValues:StringLike": {"kms:EncryptionContextKeys": "t*"}},
    {"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": ["tenant", "app"]}},
    {"Null": {"kms:EncryptionContextKeys": "false"}},
    {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
    {"DateLessThan": {"aws:CurrentTime": "2030-01-01T00:00:00Z"}},
    {"StringNotEqualsIfExists": {"kms:EncryptionContext:tenant": "b"}},
    {"StringEquals": {"kms:CallerAccount": ACCOUNT}},
    {"StringLike": {"kms:EncryptionContext:user": "${aws:username}"}},
]
CALLERS = [ALICE, BOB, ROLE, SESSION, ROOT, EXTERNAL, f"arn:aws:iam::{OTHER}:root"]
CONTEXTS = [{}, {"kms:EncryptionContext:tenant": "a", "kms:EncryptionContextKeys": ["tenant"]},
            {"kms:EncryptionContext:Tenant": "b", "kms:EncryptionContextKeys": ["Tenant", "app"]},
            {"aws:SourceIp": "10.1.2.3", "aws:SecureTransport": True,
             "aws:CurrentTime": datetime(2026, 1, 1)},
            {"aws:SourceIp": "192.0.2.1", "aws:SecureTransport": False,
             "kms:EncryptionContextKeys": []}]


def one_or_many(values: list[Any]) -> st.SearchStrategy[Any]:
    return st.sampled_from(values) | st.lists(st.sampled_from(values), min_size=1, max_size=3)


@st.composite
def statements(draw: st.DrawFn, identity: bool = False) -> dict:
    stmt: dict[str, Any] = {"Effect": draw(st.sampled_from(["Allow", "Deny"]))}
    if not identity:
        stmt[draw(st.sampled_from(["Principal", "Principal", "NotPrincipal"]))] = \
            draw(st.sampled_from(PRINCIPALS))
    stmt[draw(st.sampled_from(["Action", "Action", "NotAction"]))] = draw(one_or_many(ACTIONS))
    stmt[draw(st.sampled_from(["Resource", "Resource", "NotResource"]))] = \
        draw(one_or_many(RESOURCES))
    conditions = draw(st.lists(st.sampled_from(CONDITIONS), max_size=2))
    if conditions:
        stmt["Condition"] = {k: v for c in conditions for k, v in c.items()}
    return stmt


def as_policy(stmts: list[dict], kind: PolicyKind = PolicyKind.KEY) -> Policy:
    return parse_policy(json.dumps({"Version": "2012-10-17", "Statement": stmts}), kind)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[dict], list[list[dict]], RequestFacts]:
    key_stmts = draw(st.lists(statements(), min_size=1, max_size=4))
    identity = draw(st.lists(st.lists(statements(identity=True), min_size=1, max_size=3),
                             max_size=2))
    caller = draw(st.sampled_from(CALLERS))
    request = RequestFacts(caller, account_of(caller),
                           draw(st.sampled_from(["kms:Decrypt", "kms:Encrypt",
                                                 "kms:ReEncryptFrom", "kms:PutKeyPolicy"])),
                           draw(st.sampled_from([KEY, OTHER_KEY])),
                           draw(st.sampled_from(CONTEXTS)))
    return key_stmts, identity, request


PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(scenarios(), st.sampled_from(["everyone", "caller", "account"]), st.booleans())
def test_deny_dominates(scenario: Any, form: str, in_identity: bool) -> None:
    key_stmts, identity, request = scenario
    principal = {"everyone": "*", "caller": {"AWS": request.principal_arn},
                 "account": {"AWS": request.principal_account}}[form]
    matching_deny = {"Effect": "Deny", "Principal": principal, "Action": request.action,
                     "Resource": "*"}
    if in_identity:
        del matching_deny["Principal"]
        identity = [*identity, [matching_deny]]
    else:
        key_stmts = [*key_stmts, matching_deny]
        assert evaluate_statements(as_policy(key_stmts), request) is Decision.EXPLICIT_DENY
    policies = [as_policy(s, PolicyKind.IDENTITY) for s in identity]
    assert authorize(as_policy(key_stmts), policies, request) is Decision.EXPLICIT_DENY


@PROPERTY
@given(scenarios(), statements(), st.booleans())
def test_statement_that_matches_nothing_changes_nothing(scenario: Any, extra: dict,
                                                        in_identity: bool) -> None:
    key_stmts, identity, request = scenario
    inert = {k: v for k, v in extra.items() if k not in ("Action", "NotAction")}
    inert["Action"] = "kms:NeverCalledOperation"
    key = as_policy(key_stmts)
    policies = [as_policy(s, PolicyKind.IDENTITY) for s in identity]
    before = (check_access(key, policies, request), evaluate_key_policy(key, request),
              evaluate_statements(key, request))
    if in_identity:
        inert.pop("Principal", None)
        inert.pop("NotPrincipal", None)
        policies = [*policies, as_policy([inert], PolicyKind.IDENTITY)]
    else:
        key = as_policy([*key_stmts, inert])
    after = (check_access(key, policies, request), evaluate_key_policy(key, request),
             evaluate_statements(key, request))
    assert after == before


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab*?[]!:\\.\n", max_size=8), st.text(alphabet="ab[]!:\\.\n",
                                                               max_size=8))
def test_wildcard_agrees_with_fnmatch(pattern: str, value: str) -> None:
    assert wildcard_match(pattern, value) == \
        fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
OPERATOR_NAMES = ["StringEquals", "ForAnyValue:StringLike", "ForAllValues:NumericLessThan",
                  "DateGreaterThanIfExists", "Null", "IpAddress", "ArnLike", "BinaryEquals",
                  "Bool", "NotIpAddressIfExists", "ForOne:Bool", "NullIfExists"]
SCALARS = st.sampled_from(["*", "kms:*", "Allow", "Deny", KEY, ACCOUNT, ROOT, "10.0.0.0/8",
                           "2020-01-01", "true", "QQ==", "${aws:username}", "arn:aws:kms:*"])
VALUES = SCALARS | JSON | st.lists(SCALARS, max_size=3)
STATEMENT_LIKE = st.dictionaries(
    st.sampled_from(["Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction",
                     "Resource", "NotResource", "Condition", "Extra"]),
    VALUES | st.dictionaries(st.sampled_from(["AWS", "Service", "Other"]), VALUES, max_size=2)
    | st.dictionaries(st.sampled_from(OPERATOR_NAMES),
                      st.dictionaries(st.sampled_from(["aws:SourceIp", "kms:X", "aws:CurrentTime"]),
                                      VALUES, max_size=2) | VALUES, max_size=2),
    max_size=7)
POLICY_LIKE = st.fixed_dictionaries(
    {"Statement": STATEMENT_LIKE | st.lists(STATEMENT_LIKE, max_size=3) | JSON},
    optional={"Version": st.sampled_from(["2012-10-17", "2008-10-17", "2020"]) | JSON,
              "Id": JSON})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON | POLICY_LIKE, st.sampled_from(list(PolicyKind)), st.sampled_from(CALLERS),
       st.sampled_from(CONTEXTS))
def test_parse_only_raises_malformed_and_parsed_policies_evaluate(
        document: Any, kind: PolicyKind, caller: str, context: dict) -> None:
    try:
        policy = parse_policy(json.dumps(document), kind)
    except MalformedPolicyDocumentException as exc:
        assert isinstance(exc, KmsError) and exc.message
        return
    request = RequestFacts(caller, account_of(caller), "kms:Decrypt", KEY, context)
    assert evaluate_statements(policy, request) in Decision
    assert authorize(policy, [], request) in Decision
