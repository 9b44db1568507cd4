"""Deciding every request the way AWS KMS does: key policy, identity policies, grants.

The facts of a request (principal, action, key ARN, condition keys) are built
here in one place for every operation, so a handler only names its operation.
Policies are parsed once per distinct document and cached. A refusal raises
AccessDeniedException with AWS's message form. Each allow of a key-bound
request is recorded on the request context as (key id, key epoch), so the
audit commit can re-check it at its log position.
"""

from __future__ import annotations

import base64
import binascii
import datetime
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from cluster.state import GrantRecord, KeyRecord, KmsState, PrincipalRecord
from kmsd.auth.policy import (
    Authorization,
    Decision,
    DenialReason,
    Policy,
    PolicyKind,
    RequestFacts,
    access_denied_message,
    check_access,
    evaluate_statements,
    parse_policy,
)
from kmsd.errors import AccessDeniedException, InvalidGrantTokenException
from kmsd.service.context import RequestContext

GRANT_TOKEN_PREFIX = "kmsd1."
GRANT_ID_BYTES = 32

# Grant operations that a grant for the key's operation name covers (AWS grant operations).
_GRANT_OPERATION_FOR = {"ReEncrypt": ("ReEncryptFrom", "ReEncryptTo")}


def make_grant_token(grant_id: str, nonce: bytes) -> str:
    """An opaque token naming the grant (its 32-byte id) plus a random nonce."""
    raw = bytes.fromhex(grant_id) + nonce
    return GRANT_TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def grant_id_from_token(token: str) -> str:
    if not token.startswith(GRANT_TOKEN_PREFIX):
        raise InvalidGrantTokenException("Invalid grant token.")
    body = token[len(GRANT_TOKEN_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise InvalidGrantTokenException("Invalid grant token.") from None
    if len(raw) < GRANT_ID_BYTES:
        raise InvalidGrantTokenException("Invalid grant token.")
    return raw[:GRANT_ID_BYTES].hex()


def _grant_allows(grant: GrantRecord, principal_arn: str, operation: str,
                  context: Mapping[str, str] | None) -> bool:
    if grant.grantee_principal != principal_arn:
        return False
    wanted = _GRANT_OPERATION_FOR.get(operation, (operation,))
    if not any(op in grant.operations for op in wanted):
        return False
    given = dict(context or {})
    if grant.encryption_context_equals is not None and dict(
            grant.encryption_context_equals) != given:
        return False
    if grant.encryption_context_subset is not None:
        return all(given.get(k) == v for k, v in grant.encryption_context_subset)
    return True


class Authorizer:
    def __init__(self, state: KmsState, cache_size: int = 1024) -> None:
        self.state = state
        self._parsed: OrderedDict[tuple[str, PolicyKind], Policy] = OrderedDict()
        self._verdicts: dict[tuple[Any, ...], Authorization] = {}
        self._cache_size = cache_size

    def _policy(self, document: str, kind: PolicyKind) -> Policy:
        cache_key = (document, kind)
        policy = self._parsed.get(cache_key)
        if policy is None:
            policy = parse_policy(document, kind)
            self._parsed[cache_key] = policy
            if len(self._parsed) > self._cache_size:
                self._parsed.popitem(last=False)
        else:
            self._parsed.move_to_end(cache_key)
        return policy

    def _identity_policies(self, principal: PrincipalRecord | None) -> list[Policy]:
        if principal is None:
            return []
        return [self._policy(doc, PolicyKind.IDENTITY) for _, doc in principal.policies]

    def facts(self, ctx: RequestContext, operation: str, record: KeyRecord | None,
              params: Mapping[str, Any], with_context: bool = True) -> RequestFacts:
        """The request as policies see it; without its condition keys if not `with_context`
        (for policies with no Condition, which never read them)."""
        return RequestFacts(
            principal_arn=ctx.caller.principal_arn,
            principal_account=ctx.caller.account_id,
            action=f"kms:{operation}",
            resource=record.arn if record is not None else "*",
            context=self._conditions(ctx, operation, record, params) if with_context else {})

    def _conditions(self, ctx: RequestContext, operation: str, record: KeyRecord | None,
                    params: Mapping[str, Any]) -> dict[str, Any]:
        conditions: dict[str, Any] = {
            "aws:SourceIp": ctx.source_ip,
            "aws:CurrentTime": datetime.datetime.now(datetime.UTC),
            "aws:SecureTransport": ctx.secure_transport,
        }
        context = params.get("EncryptionContext") or params.get("SourceEncryptionContext")
        if context is not None or operation in ("Encrypt", "Decrypt", "GenerateDataKey",
                                                "GenerateDataKeyWithoutPlaintext", "ReEncrypt"):
            context = context or {}
            conditions["kms:EncryptionContextKeys"] = sorted(context)
            for key, value in context.items():
                conditions[f"kms:EncryptionContext:{key}"] = value
        for param, condition in (("EncryptionAlgorithm", "kms:EncryptionAlgorithm"),
                                 ("SigningAlgorithm", "kms:SigningAlgorithm"),
                                 ("MacAlgorithm", "kms:MacAlgorithm"),
                                 ("RotationPeriodInDays", "kms:RotationPeriodInDays"),
                                 ("PendingWindowInDays",
                                  "kms:ScheduleKeyDeletionPendingWindowInDays"),
                                 ("GranteePrincipal", "kms:GranteePrincipal"),
                                 ("RetiringPrincipal", "kms:RetiringPrincipal")):
            if param in params:
                conditions[condition] = params[param]
        if "Operations" in params:
            conditions["kms:GrantOperations"] = list(params["Operations"])
            conditions["kms:GrantIsForAWSResource"] = False
        key_id = params.get("KeyId")
        if isinstance(key_id, str) and "alias/" in key_id:
            conditions["kms:RequestAlias"] = key_id[key_id.index("alias/"):]
        tags = params.get("Tags")
        if tags:
            for tag in tags:
                conditions[f"aws:RequestTag/{tag['TagKey']}"] = tag["TagValue"]
            conditions["aws:TagKeys"] = [t["TagKey"] for t in tags]
        if "TagKeys" in params:
            conditions["aws:TagKeys"] = list(params["TagKeys"])
        if record is not None:
            conditions["kms:KeySpec"] = record.key_spec
            conditions["kms:KeyUsage"] = record.key_usage
            conditions["kms:KeyOrigin"] = record.origin
            conditions["kms:ResourceAliases"] = sorted(
                a.alias_name for a in list(self.state.aliases.values())
                if a.target_key_id == record.key_id)
            for key, value in record.tags:
                conditions[f"aws:ResourceTag/{key}"] = value
        return conditions

    def check(self, ctx: RequestContext, operation: str, record: KeyRecord | None,
              params: Mapping[str, Any]) -> None:
        """Allow, or raise AccessDeniedException. Records (key, epoch) of an allow."""
        principal = self.state.principals.get(ctx.caller.principal_arn)
        identity = self._identity_policies(principal)
        # Gathering the condition keys (encryption context, the key's aliases and tags, the
        # time...) is most of the cost of a decision; without a Condition nothing reads them.
        if record is None:
            facts = self.facts(ctx, operation, None, params,
                               with_context=any(p.conditional for p in identity))
            self._check_without_key(ctx, facts, identity)
            return
        key_policy = self._policy(record.policy, PolicyKind.KEY)
        facts: RequestFacts | None = None
        if key_policy.conditional or any(p.conditional for p in identity):
            facts = self.facts(ctx, operation, record, params)
            verdict = check_access(key_policy, identity, facts)
        else:
            verdict = self._unconditional_verdict(ctx, operation, record, params, key_policy,
                                                  principal, identity)
        if verdict.decision != Decision.ALLOW:
            context = params.get("EncryptionContext") or params.get("SourceEncryptionContext")
            if verdict.decision == Decision.EXPLICIT_DENY or not self._granted(
                    ctx, operation, record, context, params.get("GrantTokens") or ()):
                assert verdict.reason is not None
                facts = facts or self.facts(ctx, operation, record, params, with_context=False)
                raise AccessDeniedException(access_denied_message(facts, verdict.reason))
        ctx.decisions.append((record.key_id, record.epoch))
        ctx.authorized.append((operation, record.key_id))

    def _unconditional_verdict(self, ctx: RequestContext, operation: str, record: KeyRecord,
                               params: Mapping[str, Any], key_policy: Policy,
                               principal: PrincipalRecord | None,
                               identity: list[Policy]) -> Authorization:
        """check_access for policies without a Condition, remembered.

        Such a verdict depends on nothing but the policy documents and who asks for which
        action on which key, so those (the documents themselves, not a version of them)
        are the cache key: an edited policy or a caller's changed identity policies are a
        different key, and a stale verdict cannot be found.
        """
        cache_key = (record.policy, principal.policies if principal is not None else (),
                     ctx.caller.principal_arn, ctx.caller.account_id, operation, record.arn)
        verdict = self._verdicts.get(cache_key)
        if verdict is None:
            facts = self.facts(ctx, operation, record, params, with_context=False)
            verdict = check_access(key_policy, identity, facts)
            if len(self._verdicts) >= self._cache_size:
                # Insertion order makes the first the oldest; pop with a default so that
                # two threads evicting the same entry cannot fail.
                self._verdicts.pop(next(iter(self._verdicts)), None)
            self._verdicts[cache_key] = verdict
        return verdict

    def _check_without_key(self, ctx: RequestContext, facts: RequestFacts,
                           identity: list[Policy]) -> None:
        decisions = [evaluate_statements(p, facts) for p in identity]
        if Decision.EXPLICIT_DENY in decisions:
            raise AccessDeniedException(access_denied_message(
                facts, DenialReason.EXPLICIT_DENY_IN_IDENTITY_POLICY))
        is_root = ctx.caller.principal_arn.endswith(":root")
        if not is_root and Decision.ALLOW not in decisions:
            raise AccessDeniedException(access_denied_message(
                facts, DenialReason.NO_IDENTITY_POLICY_ALLOWS))

    def _granted(self, ctx: RequestContext, operation: str, record: KeyRecord,
                 context: Mapping[str, str] | None, grant_tokens: Any) -> bool:
        for token in grant_tokens:
            grant_id_from_token(token)  # a malformed token is an error even if unneeded
        return any(_grant_allows(g, ctx.caller.principal_arn, operation, context)
                   for g in list(self.state.grants.values()) if g.key_id == record.key_id)

    def tokens_missing_locally(self, grant_tokens: Any) -> bool:
        """Whether a presented grant token names a grant this replica has not applied yet."""
        return any(grant_id_from_token(t) not in self.state.grants for t in grant_tokens or ())
