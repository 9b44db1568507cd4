"""IAM policy documents for AWS KMS: parsing, evaluation and the KMS authorization rule.

Owns: turning a JSON key policy or identity policy into frozen dataclasses (with
MalformedPolicyDocumentException messages that say what is wrong), deciding whether a
policy's statements allow or explicitly deny one request, combining a key policy with the
caller's identity policies the way AWS KMS does, AWS's AccessDeniedException message forms,
and the key policy lockout safety check of CreateKey/PutKeyPolicy.

Never does: I/O, clock reads (aws:CurrentTime comes in the request context), logging, key
lookup or grant evaluation. It never substitutes policy variables such as
`${aws:username}`: a condition or Resource that uses one is treated as not satisfied in an
Allow statement and as satisfied in a Deny statement, so an unsupported feature can only
make the answer stricter. Condition operators live in `policy_conditions`.

Sources, cited below by tag:
  IAM-PRINCIPAL  docs.aws.amazon.com/IAM/latest/UserGuide/reference_policies_elements_principal.html
  IAM-NOTPRIN    .../reference_policies_elements_notprincipal.html
  IAM-ACTION     .../reference_policies_elements_action.html
  IAM-RESOURCE   .../reference_policies_elements_resource.html
  IAM-VERSION    .../reference_policies_elements_version.html
  IAM-DENIED     .../troubleshoot_access-denied.html
  KMS-FORMAT     docs.aws.amazon.com/kms/latest/developerguide/key-policy-overview.html
  KMS-DEFAULT    .../developerguide/key-policy-default.html
  KMS-XACCOUNT   .../developerguide/key-policy-modifying-external-accounts.html
  KMS-PUT        docs.aws.amazon.com/kms/latest/APIReference/API_PutKeyPolicy.html (Policy)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from typing import Any

from kmsd.auth.policy_conditions import (
    Condition,
    ContextValue,
    condition_holds,
    normalize_context,
    parse_condition_block,
    wildcard_match,
)
from kmsd.errors import LimitExceededException, MalformedPolicyDocumentException

MAX_KEY_POLICY_CHARS = 32768   # KMS-FORMAT: "Up to 32 kilobytes (32,768 bytes)"
VERSIONS = ("2012-10-17", "2008-10-17")   # IAM-VERSION
LOCKOUT_MESSAGE = "The new key policy will not allow you to update the key policy in the future."
INVALID_PRINCIPALS = "Policy contains a statement with one or more invalid principals."

_STATEMENT_ELEMENTS = {"Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction",
                       "Resource", "NotResource", "Condition"}
_ACTION = re.compile(r"\*|[a-z0-9-]+:[a-z0-9*?]+", re.IGNORECASE)
_ACCOUNT = re.compile(r"\d{12}")
_ARN_PRINCIPAL = re.compile(r"arn:aws[a-z-]*:(?:iam::(\d{12}):(?:root|user/.+|role/.+)"
                            r"|sts::(\d{12}):assumed-role/[^/]+/.+)")
_SERVICE = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*\.amazonaws\.com(\.cn)?")
_SESSION = re.compile(r"arn:(aws[a-z-]*):sts::(\d{12}):assumed-role/([^/]+)/.+")
_VARIABLE = re.compile(r"\$\{[^}]*\}")


class PolicyKind(Enum):
    KEY = "key"              # resource-based: every statement names its principal
    IDENTITY = "identity"    # attached to a user or role: the principal is implicit


class Effect(Enum):
    ALLOW = "Allow"
    DENY = "Deny"


class Decision(Enum):
    EXPLICIT_DENY = "explicit-deny"
    ALLOW = "allow"
    NO_MATCH = "no-match"    # implicit deny


class DenialReason(Enum):
    """Why a request was refused; the values are IAM-DENIED's policy-type phrases."""

    EXPLICIT_DENY_IN_KEY_POLICY = ("resource-based", True)
    EXPLICIT_DENY_IN_IDENTITY_POLICY = ("identity-based", True)
    NO_KEY_POLICY_ALLOWS = ("resource-based", False)
    NO_IDENTITY_POLICY_ALLOWS = ("identity-based", False)


@dataclass(frozen=True)
class Principals:
    """A parsed Principal or NotPrincipal element."""

    everyone: bool = False                    # "*" or {"AWS": "*"}
    accounts: frozenset[str] = frozenset()    # 12-digit ids, from "<id>" or ":root" ARNs
    arns: frozenset[str] = frozenset()        # user, role and role-session ARNs, exact
    services: frozenset[str] = frozenset()    # parsed for fidelity; kmsd has no such callers


@dataclass(frozen=True)
class Statement:
    sid: str | None
    effect: Effect
    principal: Principals | None
    not_principal: Principals | None
    actions: tuple[str, ...] | None
    not_actions: tuple[str, ...] | None
    resources: tuple[str, ...] | None
    not_resources: tuple[str, ...] | None
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Policy:
    version: str
    id: str | None
    statements: tuple[Statement, ...]
    kind: PolicyKind
    # Whether any statement has a Condition. Without one no decision reads the request
    # context, so the authorizer need not gather it (the default key policy has none).
    conditional: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditional", any(s.conditions for s in self.statements))


@dataclass(frozen=True)
class RequestFacts:
    """One request as the policies see it. Context key names are case-insensitive.

    aws:PrincipalArn, aws:PrincipalAccount and kms:CallerAccount are derived from the
    principal when the context does not carry them.
    """

    principal_arn: str
    principal_account: str
    action: str
    resource: str
    context: Mapping[str, ContextValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        derived = {"aws:PrincipalArn": self.principal_arn,
                   "aws:PrincipalAccount": self.principal_account,
                   "kms:CallerAccount": self.principal_account}
        given = {name.lower() for name in self.context}
        extra = {k: v for k, v in derived.items() if k.lower() not in given}
        object.__setattr__(self, "context", normalize_context({**self.context, **extra}))


@dataclass(frozen=True)
class KeyPolicyVerdict:
    """What a key policy says about one request, before identity policies are consulted."""

    explicit_deny: bool
    allows_directly: bool        # an Allow names the caller, its role, or "*"
    delegates_to_account: bool   # an Allow names the caller's account: IAM policies decide

    @property
    def decision(self) -> Decision:
        if self.explicit_deny:
            return Decision.EXPLICIT_DENY
        return Decision.ALLOW if self.allows_directly else Decision.NO_MATCH


@dataclass(frozen=True)
class Authorization:
    decision: Decision
    reason: DenialReason | None   # None exactly when the decision is ALLOW


# --- parsing ----------------------------------------------------------------------------

def _fail(message: str) -> MalformedPolicyDocumentException:
    return MalformedPolicyDocumentException(message)


def _strings(value: object, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise _fail(f"{where} must be a non-empty string or a non-empty list of them")
    return tuple(items)


def _parse_principals(value: object) -> Principals:
    # IAM-PRINCIPAL: "*" or {"AWS": ...}; 12-digit ids and ":root" ARNs name an account;
    # "You cannot use a wildcard to match part of a principal name or ARN."
    if value == "*":
        return Principals(everyone=True)
    if not isinstance(value, dict) or not value or not set(value) <= {"AWS", "Service"}:
        raise _fail(INVALID_PRINCIPALS)
    accounts, arns, everyone = set(), set(), False
    try:
        entries = _strings(value["AWS"], "AWS") if "AWS" in value else ()
        services = _strings(value["Service"], "Service") if "Service" in value else ()
    except MalformedPolicyDocumentException:
        raise _fail(INVALID_PRINCIPALS) from None
    for entry in entries:
        if entry == "*":
            everyone = True
        elif _ACCOUNT.fullmatch(entry):
            accounts.add(entry)
        elif (m := _ARN_PRINCIPAL.fullmatch(entry)) and not re.search(r"[*?]", entry):
            if entry.endswith(":root") and m.group(1):
                accounts.add(m.group(1))
            else:
                arns.add(entry)
        else:
            raise _fail(INVALID_PRINCIPALS)
    if not all(_SERVICE.fullmatch(s) for s in services):
        raise _fail(INVALID_PRINCIPALS)
    return Principals(everyone, frozenset(accounts), frozenset(arns), frozenset(services))


def _pair(raw: dict, name: str, where: str, required: bool) -> tuple[Any, Any]:
    positive, negative = raw.get(name), raw.get("Not" + name)
    for element in (name, "Not" + name):
        if element in raw and raw[element] is None:
            raise _fail(f"{where}: {element} must not be null")
    if name in raw and "Not" + name in raw:
        raise _fail(f"{where} has both {name} and Not{name}; use one of them")
    if required and name not in raw and "Not" + name not in raw:
        raise _fail(f"{where} has neither {name} nor Not{name}")
    return positive, negative


def _parse_statement(raw: object, where: str, kind: PolicyKind, variables: bool) -> Statement:
    if not isinstance(raw, dict):
        raise _fail(f"{where} must be an object")
    if unknown := sorted(set(raw) - _STATEMENT_ELEMENTS):
        raise _fail(f"{where} has unknown element(s): {', '.join(unknown)}")
    sid = raw.get("Sid")
    if sid is not None and not isinstance(sid, str):
        raise _fail(f"{where}: Sid must be a string")
    if raw.get("Effect") not in ("Allow", "Deny"):
        raise _fail(f'{where}: Effect must be "Allow" or "Deny", not {raw.get("Effect")!r}')
    principal, not_principal = _pair(raw, "Principal", where, kind is PolicyKind.KEY)
    if kind is PolicyKind.IDENTITY and (principal, not_principal) != (None, None):
        raise _fail(f"{where}: an identity-based policy cannot specify a principal")
    # KMS-PUT: a key policy statement missing Action or Resource "has no effect" but is
    # accepted; IAM (IAM-ACTION, IAM-RESOURCE) requires both in identity policies.
    actions, not_actions = _pair(raw, "Action", where, kind is PolicyKind.IDENTITY)
    resources, not_resources = _pair(raw, "Resource", where, kind is PolicyKind.IDENTITY)
    for name, value in (("Action", actions), ("NotAction", not_actions)):
        if value is not None and not all(map(_ACTION.fullmatch, _strings(value, name))):
            raise _fail(f"{where}: {name} values must be \"*\" or \"<service>:<action>\", "
                        f"got {value!r}")
    for name, value in (("Resource", resources), ("NotResource", not_resources)):
        if value is not None and not all(r == "*" or r.startswith("arn:")
                                         for r in _strings(value, name)):
            raise _fail(f'{where}: {name} values must be "*" or ARNs, got {value!r}')
    try:
        conditions = parse_condition_block(raw.get("Condition", {}), variables)
    except ValueError as exc:
        raise _fail(f"{where}: {exc}") from None
    return Statement(
        sid, Effect(raw["Effect"]),
        None if principal is None else _parse_principals(principal),
        None if not_principal is None else _parse_principals(not_principal),
        *(None if v is None else _strings(v, "") for v in
          (actions, not_actions, resources, not_resources)),
        conditions)


def parse_policy(text: str, kind: PolicyKind = PolicyKind.KEY) -> Policy:
    """Parse and validate a policy document; MalformedPolicyDocumentException says why not.

    A key policy over MAX_KEY_POLICY_CHARS raises LimitExceededException, as KMS-PUT
    documents ("If the key policy exceeds the length constraint, KMS returns a
    LimitExceededException").
    """
    if kind is PolicyKind.KEY and len(text) > MAX_KEY_POLICY_CHARS:
        raise LimitExceededException(
            f"Key policy is {len(text)} characters; the limit is {MAX_KEY_POLICY_CHARS}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(f"Policy is not valid JSON: {exc.msg} at line {exc.lineno} "
                    f"column {exc.colno}") from None
    except RecursionError:
        raise _fail("Policy is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise _fail("Policy must be a JSON object")
    if unknown := sorted(set(doc) - {"Version", "Id", "Statement"}):
        raise _fail(f"Policy has unknown top-level element(s): {', '.join(unknown)}")
    # IAM-VERSION: without "2012-10-17" its features (policy variables) are unavailable,
    # so a policy with no Version is read as the older language.
    version = doc.get("Version", "2008-10-17")
    if version not in VERSIONS:
        raise _fail(f'Version must be "2012-10-17" or "2008-10-17", not {version!r}')
    if not isinstance(doc.get("Id", ""), str):
        raise _fail("Id must be a string")
    if "Statement" not in doc:
        raise _fail("Policy has no Statement element")
    raw = doc["Statement"]
    raws = raw if isinstance(raw, list) else [raw]
    if not raws:
        raise _fail("Statement must contain at least one statement")   # KMS-FORMAT
    # IAM-VERSION: under 2008-10-17 "${...}" is a literal string, not a variable.
    variables = version == "2012-10-17"
    statements = tuple(_parse_statement(s, f"Statement {i + 1}", kind, variables)
                       for i, s in enumerate(raws))
    return Policy(version, doc.get("Id"), statements, kind)


# --- evaluation -------------------------------------------------------------------------

class _Match(Enum):
    NONE = 0
    DIRECT = 1    # the statement names this caller (or everyone)
    ACCOUNT = 2   # the statement names the caller's account


@lru_cache(maxsize=1024)
def _caller_arns(arn: str) -> frozenset[str]:
    # A role session acts as its role: a key policy naming the role applies to it.
    # (The session ARN drops the role's path, so only path-less role ARNs are recovered.)
    # Cached: a pure function of the caller, asked for each statement of each request.
    if m := _SESSION.fullmatch(arn):
        return frozenset({arn, f"arn:{m[1]}:iam::{m[2]}:role/{m[3]}"})
    return frozenset({arn})


def _is_root(facts: RequestFacts) -> bool:
    return facts.principal_arn.endswith(f"::{facts.principal_account}:root")


def _principal_match(p: Principals, facts: RequestFacts) -> _Match:
    if p.everyone or p.arns & _caller_arns(facts.principal_arn):
        return _Match.DIRECT
    return _Match.ACCOUNT if facts.principal_account in p.accounts else _Match.NONE


def _who(stmt: Statement, facts: RequestFacts, kind: PolicyKind) -> _Match:
    if kind is PolicyKind.IDENTITY:
        return _Match.DIRECT
    if stmt.principal is not None:
        return _principal_match(stmt.principal, facts)
    if stmt.not_principal is not None:
        # IAM-NOTPRIN: applies to every principal except those listed. Listing an account
        # exempts the account principal itself, not all of its users: the doc lists both
        # "user/Bob" and the account ARN so that only Bob escapes the Deny.
        p = stmt.not_principal
        excluded = (p.everyone or bool(p.arns & _caller_arns(facts.principal_arn))
                    or (_is_root(facts) and facts.principal_account in p.accounts))
        return _Match.NONE if excluded else _Match.DIRECT
    return _Match.NONE


def _listed(patterns: tuple[str, ...] | None, negated: tuple[str, ...] | None,
            value: str, fold: bool, unresolved: bool | None) -> bool:
    """Action/NotAction or Resource/NotResource. `unresolved` is what a pattern holding a
    policy variable counts as (None: variables are literal text)."""
    def hit(pattern: str, if_variable: bool) -> bool:
        if pattern == "*":  # the commonest pattern matches anything, and has no variable
            return True
        if unresolved is not None and _VARIABLE.search(pattern):
            return if_variable
        if fold:
            return wildcard_match(pattern.lower(), value.lower())
        return wildcard_match(pattern, value)
    if patterns is not None:
        return any(hit(p, bool(unresolved)) for p in patterns)
    return negated is not None and not any(hit(p, not unresolved) for p in negated)


def _applies(stmt: Statement, facts: RequestFacts, policy: Policy) -> _Match:
    deny = stmt.effect is Effect.DENY
    variables = policy.version == "2012-10-17"
    who = _who(stmt, facts, policy.kind)
    # IAM-ACTION: action names are case-insensitive; IAM-RESOURCE: ARNs are not.
    if (who is _Match.NONE
            or not _listed(stmt.actions, stmt.not_actions, facts.action, True, None)
            or not _listed(stmt.resources, stmt.not_resources, facts.resource, False,
                           deny if variables else None)):
        return _Match.NONE
    for cond in stmt.conditions:
        holds = deny if cond.has_variable else condition_holds(cond, facts.context)
        if not holds:
            return _Match.NONE
    return who


def evaluate_statements(policy: Policy, facts: RequestFacts) -> Decision:
    """Any applicable Deny wins, then any applicable Allow; otherwise an implicit deny.

    Account principals count as matching every principal of that account here (the
    generic IAM reading); `evaluate_key_policy` keeps them apart as delegation.
    """
    matches = [(s.effect, _applies(s, facts, policy)) for s in policy.statements]
    if any(e is Effect.DENY and m is not _Match.NONE for e, m in matches):
        return Decision.EXPLICIT_DENY
    if any(m is not _Match.NONE for _, m in matches):
        return Decision.ALLOW
    return Decision.NO_MATCH


def evaluate_key_policy(policy: Policy, facts: RequestFacts) -> KeyPolicyVerdict:
    """Evaluate a key policy, telling a direct Allow from delegation to the account.

    KMS-DEFAULT: when the principal is the account principal (arn:aws:iam::<id>:root or
    <id>), "the policy statement doesn't give any IAM users or roles permission to use the
    KMS key. Instead, it allows the account to use IAM policies to delegate the permissions".
    """
    matches = [(s.effect, _applies(s, facts, policy)) for s in policy.statements]
    return KeyPolicyVerdict(
        explicit_deny=any(e is Effect.DENY and m is not _Match.NONE for e, m in matches),
        allows_directly=any(e is Effect.ALLOW and m is _Match.DIRECT for e, m in matches),
        delegates_to_account=any(e is Effect.ALLOW and m is _Match.ACCOUNT
                                 for e, m in matches))


def _resource_account(resource: str) -> str | None:
    parts = resource.split(":", 5)
    return parts[4] if len(parts) == 6 and parts[0] == "arn" else None


def check_access(key_policy: Policy, identity_policies: Iterable[Policy],
                 facts: RequestFacts) -> Authorization:
    """The AWS KMS authorization rule, with the reason for a refusal.

    1. An explicit Deny in the key policy or in any of the caller's identity policies
       refuses the request (KMS-DEFAULT: "IAM policies that deny access to the key are
       still effective" even when the key policy does not enable IAM policies).
    2. A caller in the key's account is allowed when the key policy allows it directly,
       or when the key policy delegates the action to the account and one of the caller's
       identity policies allows it (KMS-DEFAULT: "Without this permission, IAM policies
       that allow access to the key are ineffective").
    3. A caller in another account needs both: the key policy must allow it (directly or
       through its account) and its identity policies must allow it too (KMS-XACCOUNT:
       "Neither the key policy nor the IAM policy alone is sufficient").
    4. Otherwise the request is implicitly denied.

    An account's root user carries no identity policies and is treated as allowed by them
    (IAM policy evaluation: "all requests are implicitly denied with the exception of the
    AWS account root user"); it still needs the key policy. Grants are not considered here.
    """
    key = evaluate_key_policy(key_policy, facts)
    identity = [evaluate_statements(p, facts) for p in identity_policies]
    if key.explicit_deny:
        return Authorization(Decision.EXPLICIT_DENY, DenialReason.EXPLICIT_DENY_IN_KEY_POLICY)
    if Decision.EXPLICIT_DENY in identity:
        return Authorization(Decision.EXPLICIT_DENY,
                             DenialReason.EXPLICIT_DENY_IN_IDENTITY_POLICY)
    if not (key.allows_directly or key.delegates_to_account):
        return Authorization(Decision.NO_MATCH, DenialReason.NO_KEY_POLICY_ALLOWS)
    identity_allows = _is_root(facts) or Decision.ALLOW in identity
    same_account = _resource_account(facts.resource) in (None, facts.principal_account)
    if (key.allows_directly and same_account) or identity_allows:
        return Authorization(Decision.ALLOW, None)
    return Authorization(Decision.NO_MATCH, DenialReason.NO_IDENTITY_POLICY_ALLOWS)


def authorize(key_policy: Policy, identity_policies: Iterable[Policy],
              facts: RequestFacts) -> Decision:
    """`check_access(...).decision`; see there for the rule and its sources."""
    return check_access(key_policy, identity_policies, facts).decision


def access_denied_message(facts: RequestFacts, reason: DenialReason) -> str:
    """AWS's AccessDeniedException message (IAM-DENIED), e.g. for KMS:

    "User: arn:aws:iam::111122223333:user/alice is not authorized to perform: kms:Decrypt
    on resource: arn:aws:kms:...:key/... because no resource-based policy allows the
    kms:Decrypt action" -- or "... with an explicit deny in a resource-based policy".
    """
    policy_type, explicit = reason.value
    head = (f"User: {facts.principal_arn} is not authorized to perform: {facts.action} "
            f"on resource: {facts.resource}")
    if explicit:
        article = "an" if policy_type[0] in "aeiou" else "a"
        return f"{head} with an explicit deny in {article} {policy_type} policy"
    return f"{head} because no {policy_type} policy allows the {facts.action} action"


def lockout_safety_check(policy: Policy, caller_principal_arn: str, account_id: str, *,
                         key_arn: str | None = None,
                         context: Mapping[str, ContextValue] | None = None) -> None:
    """Refuse a key policy that would lock the caller out of PutKeyPolicy (KMS-PUT).

    Passes when the policy, evaluated as a key policy for kms:PutKeyPolicy by the caller
    (or by the account's root), is not an explicit deny and allows directly or delegates
    to the account. `key_arn` defaults to "*", which only Resource "*" (the key policy
    convention for "this KMS key", KMS-FORMAT) matches.
    """
    for principal in (caller_principal_arn, f"arn:aws:iam::{account_id}:root"):
        facts = RequestFacts(principal, account_id, "kms:PutKeyPolicy", key_arn or "*",
                             context or {})
        verdict = evaluate_key_policy(policy, facts)
        if not verdict.explicit_deny and (verdict.allows_directly
                                          or verdict.delegates_to_account):
            return
    raise MalformedPolicyDocumentException(LOCKOUT_MESSAGE)
