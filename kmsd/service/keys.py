"""Key lifecycle: CreateKey, DescribeKey, ListKeys, EnableKey, DisableKey.

A new key's backing key is generated inside this node's HSM and enters the
Raft log only wrapped under the domain key. So is the private (or HMAC secret)
part of an asymmetric or HMAC key (kmsd.service.asymmetric); its public key is
stored in the clear. A key with Origin EXTERNAL starts without material (and,
if asymmetric, without a public key) until ImportKeyMaterial.
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

from cluster import commands
from cluster.state import (
    KEY_STATE_ENABLED,
    KEY_STATE_PENDING_DELETION,
    ORIGIN_EXTERNAL,
    SECONDS_PER_DAY,
    KeyRecord,
)
from kmsd.auth.policy import PolicyKind, lockout_safety_check, parse_policy
from kmsd.errors import NotFoundException, UnsupportedOperationException, ValidationException
from kmsd.hsm.imported_material import IMPORTABLE_KEY_SPECS
from kmsd.service import asymmetric, custom_key_stores
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.custom_key_stores import (
    KEY_STATE_UNAVAILABLE,
    ORIGIN_AWS_CLOUDHSM,
    ORIGIN_EXTERNAL_KEY_STORE,
)
from kmsd.service.key_specs import SYMMETRIC_DEFAULT, algorithm_lists, key_usage_for
from kmsd.service.pagination import page_response, paginate
from kmsd.service.rotation import key_material_id
from kmsd.service.tags import checked_tags

POLICY_NAME = "default"
DEFAULT_PENDING_WINDOW_DAYS = 30
MIN_PENDING_WINDOW_DAYS = 7
MAX_PENDING_WINDOW_DAYS = 30


def default_key_policy(account_id: str) -> str:
    # What AWS KMS attaches when CreateKey is called without a Policy.
    return json.dumps({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": f"arn:aws:iam::{account_id}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }],
    }, indent=2)


def key_metadata(record: KeyRecord, core: ServiceCore | None = None) -> dict[str, Any]:
    """DescribeKey's KeyMetadata; with `core`, a key in a disconnected custom key store shows
    the key state Unavailable (AWS: "The KMS key is unavailable because its custom key store
    is disconnected"; a key pending deletion stays PendingDeletion)."""
    key_state = record.key_state
    if (core is not None and key_state != KEY_STATE_PENDING_DELETION
            and not core.store_connected(record)):
        key_state = KEY_STATE_UNAVAILABLE
    metadata = {
        "AWSAccountId": record.account_id,
        "KeyId": record.key_id,
        "Arn": record.arn,
        "CreationDate": record.created_at,
        "Enabled": key_state == KEY_STATE_ENABLED,
        "Description": record.description,
        "KeyUsage": record.key_usage,
        "KeyState": key_state,
        "Origin": record.origin,
        "KeyManager": "CUSTOMER",
        "CustomerMasterKeySpec": record.key_spec,
        "KeySpec": record.key_spec,
        **algorithm_lists(record.key_spec, record.key_usage),
        "MultiRegion": False,
    }
    if record.origin == ORIGIN_EXTERNAL and record.expiration_model is not None:
        metadata["ExpirationModel"] = record.expiration_model
        if record.valid_to is not None:
            metadata["ValidTo"] = record.valid_to
    if record.key_spec == SYMMETRIC_DEFAULT and record.backing_keys:
        # AWS: present for symmetric encryption keys only (and not before an import).
        metadata["CurrentKeyMaterialId"] = key_material_id(record.current_backing_key)
    if record.custom_key_store_id is not None:
        metadata["CustomKeyStoreId"] = record.custom_key_store_id
        if core is not None:
            store = core.state.custom_key_stores.get(record.custom_key_store_id)
            if store is not None:
                metadata["CloudHsmClusterId"] = store.cluster_id
    if record.key_state == KEY_STATE_PENDING_DELETION:
        metadata["DeletionDate"] = record.deletion_date
        metadata["PendingDeletionWindowInDays"] = record.pending_window_days
    return metadata


async def create_key(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    key_spec = params.get("KeySpec") or params.get("CustomerMasterKeySpec") or SYMMETRIC_DEFAULT
    key_usage = key_usage_for(key_spec, params.get("KeyUsage"))
    origin = params.get("Origin") or "AWS_KMS"
    store_id = params.get("CustomKeyStoreId")
    if origin == ORIGIN_EXTERNAL_KEY_STORE or params.get("XksKeyId"):
        raise UnsupportedOperationException(custom_key_stores.XKS_UNSUPPORTED)
    if store_id is not None or origin == ORIGIN_AWS_CLOUDHSM:
        # AWS CreateKey: "To create a KMS key in an CloudHSM key store ... set [Origin] to
        # AWS_CLOUDHSM. You must also use the CustomKeyStoreId parameter ... The KeySpec value
        # must be SYMMETRIC_DEFAULT."
        if store_id is None or origin != ORIGIN_AWS_CLOUDHSM:
            raise ValidationException("A KMS key in a CloudHSM key store needs both "
                                      "CustomKeyStoreId and Origin AWS_CLOUDHSM.")
        if key_spec != SYMMETRIC_DEFAULT:
            raise UnsupportedOperationException(
                f"KeySpec {key_spec} is not valid in a custom key store: only "
                "SYMMETRIC_DEFAULT keys can be created there.")
    elif origin not in ("AWS_KMS", ORIGIN_EXTERNAL):
        raise UnsupportedOperationException(f"kmsd does not support Origin {origin} yet.")
    if origin == ORIGIN_EXTERNAL and key_spec not in IMPORTABLE_KEY_SPECS:
        raise UnsupportedOperationException(
            f"kmsd does not import key material for {key_spec} keys.")
    if params.get("MultiRegion"):
        raise UnsupportedOperationException("kmsd does not support multi-Region keys.")
    if key_spec != SYMMETRIC_DEFAULT:
        asymmetric.require_creatable(core, key_spec)
    await core.authorize(ctx, "CreateKey", None, params)
    policy = params.get("Policy") or default_key_policy(core.account_id)
    _check_key_policy(core, ctx, policy, None, params)
    tags = checked_tags(params.get("Tags", []))
    public_key = None
    if origin == ORIGIN_EXTERNAL:
        wrapped = b""  # PendingImport: the material comes with ImportKeyMaterial
    elif store_id is not None:
        # Generated in the store's token and wrapped under its store key: only that token
        # can use it.
        store_token = await custom_key_stores.token_of(core, ctx, store_id)
        wrapped = store_token.generate_wrapped_aes_key()
    elif key_spec == SYMMETRIC_DEFAULT:
        wrapped = core.hsm.generate_wrapped_aes_key()
    else:
        # In the HSM helper process for RSA (seconds); inline for EC and HMAC.
        generated = await asymmetric.generate_key(core, key_spec)
        wrapped, public_key = generated.wrapped_private, generated.public_key_der
    command = commands.CreateKey(
        key_id=str(uuid.uuid4()),
        region=ctx.region,
        account_id=core.account_id,
        description=params.get("Description", ""),
        key_usage=key_usage,
        key_spec=key_spec,
        origin=origin,
        policy=policy,
        tags=tags,
        wrapped_backing_key=wrapped,
        at=core.clock.now(),
        public_key=public_key,
        custom_key_store_id=store_id,
    )
    record = await core.commit(command)
    return {"KeyMetadata": key_metadata(record, core)}


async def describe_key(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "DescribeKey", params)
    return {"KeyMetadata": key_metadata(record, core)}


async def list_keys(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    await core.authorize(ctx, "ListKeys", None, params)
    keys = [k for k in list(core.state.keys.values()) if k.region == ctx.region]
    page, next_marker = paginate("ListKeys", keys, lambda k: k.key_id,
                                 params.get("Limit"), params.get("Marker"))
    return page_response("Keys", [{"KeyId": k.key_id, "KeyArn": k.arn} for k in page],
                         next_marker)


async def _set_enabled(core: ServiceCore, ctx: RequestContext, params: dict[str, Any],
                       enabled: bool) -> dict:
    record = await core.authorized_key(ctx, "EnableKey" if enabled else "DisableKey", params)
    await core.commit(commands.SetKeyEnabled(record.key_id, enabled, core.clock.now()))
    return {}


async def enable_key(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    return await _set_enabled(core, ctx, params, True)


async def disable_key(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    return await _set_enabled(core, ctx, params, False)


async def update_key_description(core: ServiceCore, ctx: RequestContext,
                                 params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "UpdateKeyDescription", params, allow_alias=False)
    await core.commit(commands.UpdateKeyDescription(record.key_id, params["Description"]))
    return {}


async def schedule_key_deletion(core: ServiceCore, ctx: RequestContext,
                                params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "ScheduleKeyDeletion", params, allow_alias=False)
    window = params.get("PendingWindowInDays") or DEFAULT_PENDING_WINDOW_DAYS
    # The model allows 1-365; the service accepts a waiting period of 7 to 30 days.
    if not MIN_PENDING_WINDOW_DAYS <= window <= MAX_PENDING_WINDOW_DAYS:
        bound, relation = ((MIN_PENDING_WINDOW_DAYS, "greater") if window < MIN_PENDING_WINDOW_DAYS
                           else (MAX_PENDING_WINDOW_DAYS, "less"))
        raise ValidationException(
            f"1 validation error detected: Value '{window}' at 'pendingWindowInDays' failed to "
            f"satisfy constraint: Member must have value {relation} than or equal to {bound}")
    deletion_date = core.clock.now() + window * SECONDS_PER_DAY
    updated: KeyRecord = await core.commit(
        commands.ScheduleKeyDeletion(record.key_id, deletion_date, window))
    return {"KeyId": updated.arn, "DeletionDate": updated.deletion_date,
            "KeyState": updated.key_state, "PendingWindowInDays": updated.pending_window_days}


async def cancel_key_deletion(core: ServiceCore, ctx: RequestContext,
                              params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "CancelKeyDeletion", params, allow_alias=False)
    await core.commit(commands.CancelKeyDeletion(record.key_id))
    return {"KeyId": record.arn}


def _check_policy_name(params: dict[str, Any]) -> None:
    name = params.get("PolicyName", POLICY_NAME)
    if name != POLICY_NAME:
        raise NotFoundException(f"No such policy exists: {name}. The only valid value is "
                                f"{POLICY_NAME}.")


def _check_key_policy(core: ServiceCore, ctx: RequestContext, policy: str,
                      record: KeyRecord | None, params: dict[str, Any]) -> None:
    """Parse (MalformedPolicyDocumentException) and, unless bypassed, the lockout check."""
    parsed = parse_policy(policy, PolicyKind.KEY)
    if not params.get("BypassPolicyLockoutSafetyCheck"):
        lockout_safety_check(parsed, ctx.caller.principal_arn, core.account_id,
                             key_arn=record.arn if record is not None else None)


async def get_key_policy(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "GetKeyPolicy", params, allow_alias=False)
    _check_policy_name(params)
    return {"Policy": record.policy, "PolicyName": POLICY_NAME}


async def put_key_policy(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "PutKeyPolicy", params, allow_alias=False)
    _check_policy_name(params)
    _check_key_policy(core, ctx, params["Policy"], record, params)
    await core.commit(commands.PutKeyPolicy(record.key_id, params["Policy"]))
    return {}


async def list_key_policies(core: ServiceCore, ctx: RequestContext,
                            params: dict[str, Any]) -> dict:
    await core.authorized_key(ctx, "ListKeyPolicies", params, allow_alias=False)
    page, next_marker = paginate("ListKeyPolicies", ["default"], lambda name: name,
                                 params.get("Limit"), params.get("Marker"))
    return page_response("PolicyNames", page, next_marker)


async def get_key_last_usage(core: ServiceCore, ctx: RequestContext,
                             params: dict[str, Any]) -> dict:
    """The last successful cryptographic use, as recorded by the committed audit chain."""
    record = await core.authorized_key(ctx, "GetKeyLastUsage", params)
    started = core.state.usage_tracking_start
    response: dict[str, Any] = {
        "KeyId": record.arn, "KeyCreationDate": record.created_at,
        "TrackingStartDate": _epoch(started) if started else record.created_at}
    usage = core.state.key_usage.get(record.key_id)
    if usage is not None:
        response["KeyLastUsage"] = {
            "Operation": usage.operation, "Timestamp": _epoch(usage.event_time),
            "CloudTrailEventId": usage.event_id, "KmsRequestId": usage.request_id}
    return response


def _epoch(event_time: str) -> float:
    return datetime.datetime.strptime(event_time, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC).timestamp()
