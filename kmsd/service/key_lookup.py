"""Resolving a KeyId parameter the way AWS KMS does.

A KeyId may be a key id, a key ARN, an alias name (`alias/...`) or an alias
ARN. Keys and aliases belong to one region: an identifier naming another
region, or another account, is not found.
"""

from __future__ import annotations

import re

from cluster.state import KeyRecord, KmsState, alias_arn, key_arn
from kmsd.errors import NotFoundException

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ARN = re.compile(r"arn:aws:kms:([a-z0-9-]+):(\d{12}):(key/.+|alias/.+)", re.DOTALL)


def is_key_id(value: str) -> bool:
    return bool(_UUID.fullmatch(value))


def resolve_key(state: KmsState, region: str, account_id: str, identifier: str,
                allow_alias: bool = True) -> KeyRecord:
    target = identifier
    arn = _ARN.fullmatch(identifier)
    if arn:
        arn_region, arn_account, target = arn.groups()
        if arn_region != region or arn_account != account_id:
            raise NotFoundException(f"Invalid arn {identifier}")
        if target.startswith("key/"):
            target = target[4:]
            if not is_key_id(target):
                raise NotFoundException(f"Invalid keyId '{identifier}'")
    if target.startswith("alias/"):
        if not allow_alias:
            raise NotFoundException(f"Invalid keyId '{identifier}'")
        alias = state.aliases.get((region, target))
        if alias is None:
            raise NotFoundException(f"Alias {alias_arn(region, account_id, target)} is not found.")
        target = alias.target_key_id
    elif not is_key_id(target):
        raise NotFoundException(f"Invalid keyId '{identifier}'")
    record = state.keys.get(target)
    if record is None or record.region != region or record.account_id != account_id:
        raise NotFoundException(f"Key '{key_arn(region, account_id, target)}' does not exist")
    return record
