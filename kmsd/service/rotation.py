"""Rotation: EnableKeyRotation, DisableKeyRotation, GetKeyRotationStatus,
RotateKeyOnDemand, ListKeyRotations.

A rotation is a new backing-key version generated in the HSM; new ciphertexts
use it and every older version stays to decrypt what it encrypted. Automatic
rotations are proposed by the leader's scheduler (kmsd/service/scheduler.py).
"""

from __future__ import annotations

import hashlib
from typing import Any

from cluster import commands
from cluster.state import ROTATION_ON_DEMAND, BackingKey, KeyRecord
from kmsd.errors import UnsupportedOperationException
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.pagination import page_response, paginate

DEFAULT_ROTATION_PERIOD_DAYS = 365
MAX_ON_DEMAND_ROTATIONS = 10


def key_material_id(backing: BackingKey) -> str:
    """Stable for the life of the material: a domain-key rotation re-wraps it but keeps the id
    (the SHA-256 of the blob it first had)."""
    return backing.material_id or hashlib.sha256(backing.wrapped).hexdigest()


def _require_rotatable(record: KeyRecord) -> None:
    if record.key_spec != "SYMMETRIC_DEFAULT" or record.origin != "AWS_KMS":
        raise UnsupportedOperationException(
            f"{record.arn} key spec {record.key_spec} with origin {record.origin} does not "
            "support rotation.")


async def enable_key_rotation(core: ServiceCore, ctx: RequestContext,
                              params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "EnableKeyRotation", params, allow_alias=False)
    _require_rotatable(record)
    period = params.get("RotationPeriodInDays") or DEFAULT_ROTATION_PERIOD_DAYS
    await core.commit(commands.SetKeyRotation(record.key_id, True, period, core.clock.now()))
    return {}


async def disable_key_rotation(core: ServiceCore, ctx: RequestContext,
                               params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "DisableKeyRotation", params, allow_alias=False)
    _require_rotatable(record)
    await core.commit(commands.SetKeyRotation(record.key_id, False, 0, core.clock.now()))
    return {}


async def get_key_rotation_status(core: ServiceCore, ctx: RequestContext,
                                  params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "GetKeyRotationStatus", params, allow_alias=False)
    _require_rotatable(record)
    response: dict[str, Any] = {"KeyRotationEnabled": record.rotation_enabled,
                                "KeyId": record.arn}
    if record.rotation_enabled:
        response["RotationPeriodInDays"] = record.rotation_period_days
        response["NextRotationDate"] = record.next_rotation_at
    return response


async def rotate(core: ServiceCore, record: KeyRecord, rotation_type: str) -> KeyRecord | None:
    return await core.commit(commands.RotateKey(
        key_id=record.key_id, wrapped_backing_key=core.hsm.generate_wrapped_aes_key(),
        rotation_type=rotation_type, expected_version=record.current_backing_key.version,
        max_on_demand=MAX_ON_DEMAND_ROTATIONS, at=core.clock.now()))


async def rotate_key_on_demand(core: ServiceCore, ctx: RequestContext,
                               params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "RotateKeyOnDemand", params, allow_alias=False)
    _require_rotatable(record)
    await rotate(core, record, ROTATION_ON_DEMAND)
    return {"KeyId": record.arn}


async def list_key_rotations(core: ServiceCore, ctx: RequestContext,
                             params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "ListKeyRotations", params, allow_alias=False)
    _require_rotatable(record)
    include_all = params.get("IncludeKeyMaterial") == "ALL_KEY_MATERIAL"
    versions = [b for b in record.backing_keys if include_all or b.rotation_type is not None]
    current = record.current_backing_key.version
    page, next_marker = paginate("ListKeyRotations", versions, lambda b: f"{b.version:010d}",
                                 params.get("Limit"), params.get("Marker"))
    entries = []
    for backing in page:
        entry: dict[str, Any] = {
            "KeyId": record.arn,
            "KeyMaterialId": key_material_id(backing),
            "KeyMaterialState": "CURRENT" if backing.version == current else "NON_CURRENT",
            "RotationDate": backing.created_at,
        }
        if backing.rotation_type is not None:
            entry["RotationType"] = backing.rotation_type
        entries.append(entry)
    return page_response("Rotations", entries, next_marker)
