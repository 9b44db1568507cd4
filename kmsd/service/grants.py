"""Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant.

A grant lets its grantee principal call the listed operations on one key,
optionally only with a given encryption context. It takes effect on every
node at its log position; its grant token lets the grantee use it at once on
any node (the node catches up to the grant before deciding). Retiring or
revoking a grant bumps the key's epoch, so decisions in flight that relied on
it are revoked when their audit records commit.
"""

from __future__ import annotations

from typing import Any

from cluster import commands
from cluster.state import GrantRecord
from kmsd.auth.authorizer import GRANT_ID_BYTES, grant_id_from_token, make_grant_token
from kmsd.errors import (
    AccessDeniedException,
    DryRunOperationException,
    NotFoundException,
    ValidationException,
)
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.crypto import DRY_RUN_MESSAGE
from kmsd.service.pagination import page_response, paginate

# AWS KMS quotas: grants per KMS key, and grants for one grantee principal per key.
MAX_GRANTS_PER_KEY = 50000
MAX_GRANTS_PER_GRANTEE = 500
_SYMMETRIC_OPERATIONS = frozenset({
    "Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom", "ReEncryptTo", "CreateGrant", "RetireGrant", "DescribeKey",
    "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext"})


def _required(params: dict[str, Any], member: str) -> str:
    """A member the model leaves optional but the operation needs."""
    if member not in params:
        name = member[0].lower() + member[1:]
        raise ValidationException(f"1 validation error detected: Value null at '{name}' "
                                  "failed to satisfy constraint: Member must not be null")
    return params[member]


def _pairs(context: dict[str, str] | None) -> tuple[tuple[str, str], ...] | None:
    return None if context is None else tuple(sorted(context.items()))


def grant_entry(grant: GrantRecord, key_arn: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "KeyId": key_arn, "GrantId": grant.grant_id, "CreationDate": grant.created_at,
        "GranteePrincipal": grant.grantee_principal,
        "IssuingAccount": f"arn:aws:iam::{grant.issuing_account}:root",
        "Operations": list(grant.operations),
    }
    if grant.name:
        entry["Name"] = grant.name
    if grant.retiring_principal:
        entry["RetiringPrincipal"] = grant.retiring_principal
    constraints = {}
    if grant.encryption_context_equals is not None:
        constraints["EncryptionContextEquals"] = dict(grant.encryption_context_equals)
    if grant.encryption_context_subset is not None:
        constraints["EncryptionContextSubset"] = dict(grant.encryption_context_subset)
    if constraints:
        entry["Constraints"] = constraints
    return entry


async def create_grant(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "CreateGrant", params, allow_alias=False)
    operations = tuple(dict.fromkeys(params["Operations"]))
    if record.key_spec == "SYMMETRIC_DEFAULT" and not set(operations) <= _SYMMETRIC_OPERATIONS:
        invalid = sorted(set(operations) - _SYMMETRIC_OPERATIONS)
        raise ValidationException(
            f"Grant operations {invalid} are not valid for {record.arn}.")
    constraints = params.get("Constraints") or {}
    if params.get("DryRun"):
        raise DryRunOperationException(DRY_RUN_MESSAGE)
    grant_id = core.random(GRANT_ID_BYTES).hex()
    grant: GrantRecord = await core.commit(commands.CreateGrant(
        grant_id=grant_id, grant_token=make_grant_token(grant_id, core.random(16)),
        key_id=record.key_id, name=params.get("Name", ""),
        grantee_principal=_required(params, "GranteePrincipal"),
        retiring_principal=params.get("RetiringPrincipal", ""), operations=operations,
        encryption_context_equals=_pairs(constraints.get("EncryptionContextEquals")),
        encryption_context_subset=_pairs(constraints.get("EncryptionContextSubset")),
        issuing_account=core.account_id, max_grants_per_key=MAX_GRANTS_PER_KEY,
        max_grants_per_grantee=MAX_GRANTS_PER_GRANTEE, at=core.clock.now()))
    return {"GrantToken": grant.grant_token, "GrantId": grant.grant_id}


async def list_grants(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "ListGrants", params)
    grants = [g for g in list(core.state.grants.values()) if g.key_id == record.key_id
              and params.get("GrantId") in (None, g.grant_id)
              and params.get("GranteePrincipal") in (None, g.grantee_principal)]
    page, next_marker = paginate("ListGrants", grants, lambda g: g.grant_id,
                                 params.get("Limit"), params.get("Marker"), default_limit=50)
    return page_response("Grants", [grant_entry(g, record.arn) for g in page], next_marker)


async def list_retirable_grants(core: ServiceCore, ctx: RequestContext,
                                params: dict[str, Any]) -> dict:
    await core.authorize(ctx, "ListRetirableGrants", None, params)
    retiring = _required(params, "RetiringPrincipal")
    grants = [g for g in list(core.state.grants.values()) if g.retiring_principal == retiring
              and (key := core.state.keys.get(g.key_id)) is not None
              and key.region == ctx.region]
    page, next_marker = paginate("ListRetirableGrants", grants, lambda g: g.grant_id,
                                 params.get("Limit"), params.get("Marker"), default_limit=50)
    return page_response(
        "Grants", [grant_entry(g, core.state.keys[g.key_id].arn) for g in page
                   if g.key_id in core.state.keys], next_marker)


async def _find_grant(core: ServiceCore, grant_id: str) -> GrantRecord:
    grant = core.state.grants.get(grant_id)
    if grant is None:
        await core.catch_up()
        grant = core.state.grants.get(grant_id)
    if grant is None:
        raise NotFoundException(f"Grant ID {grant_id} not found")
    return grant


async def retire_grant(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    if "GrantToken" in params:
        grant = await _find_grant(core, grant_id_from_token(params["GrantToken"]))
    elif "KeyId" in params and "GrantId" in params:
        record = await core.find_key(ctx, params["KeyId"], allow_alias=False)
        grant = await _find_grant(core, params["GrantId"])
        if grant.key_id != record.key_id:
            raise NotFoundException(f"Grant ID {params['GrantId']} not found")
    else:
        raise ValidationException("Either GrantToken, or both KeyId and GrantId, are required.")
    caller = ctx.caller.principal_arn
    # AWS: the retiring principal, or the grantee if the grant allows RetireGrant.
    may_retire = (caller == grant.retiring_principal
                  or (caller == grant.grantee_principal and "RetireGrant" in grant.operations))
    if not may_retire:
        raise AccessDeniedException(
            f"User: {caller} is not authorized to perform: kms:RetireGrant on grant "
            f"{grant.grant_id}")
    if params.get("DryRun"):
        raise DryRunOperationException(DRY_RUN_MESSAGE)
    await core.commit(commands.RemoveGrant(grant.key_id, grant.grant_id))
    return {}


async def revoke_grant(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "RevokeGrant", params, allow_alias=False)
    grant = await _find_grant(core, params["GrantId"])
    if grant.key_id != record.key_id:
        raise NotFoundException(f"Grant ID {params['GrantId']} not found")
    if params.get("DryRun"):
        raise DryRunOperationException(DRY_RUN_MESSAGE)
    await core.commit(commands.RemoveGrant(record.key_id, grant.grant_id))
    return {}
