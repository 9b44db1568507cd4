"""Principals (users, roles, the account root), their access keys and identity policies.

Managed through the admin API by the account root only. A new access key's
secret is drawn from the HSM, sealed under the domain key before it enters
the Raft log, and returned to the caller once; it is never logged or stored
in plaintext.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cluster import commands
from cluster.state import PrincipalRecord
from kmsd.auth.credentials import secret_aad
from kmsd.auth.policy import PolicyKind, parse_policy
from kmsd.bootstrap import new_access_key_id, new_secret
from kmsd.errors import AccessDeniedException, NotFoundException, ValidationException
from kmsd.service.context import Caller
from kmsd.service.core import ServiceCore

KINDS = ("user", "role")
_NAME = re.compile(r"^[\w+=,.@-]{1,64}$")
_POLICY_NAME = re.compile(r"^[\w+=,.@-]{1,128}$")


@dataclass(frozen=True)
class NewAccessKey:
    access_key_id: str
    secret_access_key: str


def root_arn(account_id: str) -> str:
    return f"arn:aws:iam::{account_id}:root"


def principal_arn(account_id: str, kind: str, name: str) -> str:
    if kind not in KINDS:
        raise ValidationException(f"Principal kind must be one of {', '.join(KINDS)}.")
    if not _NAME.match(name):
        raise ValidationException(f"Invalid principal name {name!r}.")
    return f"arn:aws:iam::{account_id}:{kind}/{name}"


def require_root(caller: Caller) -> None:
    if caller.principal_arn != root_arn(caller.account_id):
        raise AccessDeniedException(
            f"User: {caller.principal_arn} is not authorized to manage principals; only the "
            "account root is.")


def describe(core: ServiceCore, record: PrincipalRecord) -> dict[str, Any]:
    return {
        "Arn": record.arn, "Kind": record.kind, "Name": record.name,
        "CreationDate": record.created_at,
        "Policies": [name for name, _ in record.policies],
        "AccessKeys": sorted(k.access_key_id for k in list(core.state.access_keys.values())
                             if k.principal_arn == record.arn),
    }


async def create_principal(core: ServiceCore, kind: str, name: str) -> PrincipalRecord:
    arn = principal_arn(core.account_id, kind, name)
    return await core.commit(commands.PutPrincipal(arn, core.account_id, kind, name,
                                                   core.clock.now()))


async def ensure_root(core: ServiceCore) -> None:
    if root_arn(core.account_id) not in core.state.principals:
        await core.commit(commands.PutPrincipal(root_arn(core.account_id), core.account_id,
                                                "root", "root", core.clock.now()))


def _existing(core: ServiceCore, arn: str) -> PrincipalRecord:
    record = core.state.principals.get(arn)
    if record is None:
        raise NotFoundException(f"Principal {arn} does not exist.")
    return record


async def delete_principal(core: ServiceCore, kind: str, name: str) -> None:
    await core.commit(commands.DeletePrincipal(principal_arn(core.account_id, kind, name)))


async def add_access_key(core: ServiceCore, arn: str, access_key_id: str,
                         secret: str) -> None:
    await add_sealed_access_key(core, arn, access_key_id,
                                core.hsm.seal(secret.encode(), secret_aad(access_key_id)))


async def add_sealed_access_key(core: ServiceCore, arn: str, access_key_id: str,
                                sealed: bytes) -> None:
    await core.commit(commands.PutAccessKey(access_key_id, arn, core.account_id, sealed,
                                            core.clock.now()))


async def create_access_key(core: ServiceCore, kind: str, name: str) -> NewAccessKey:
    arn = _existing(core, principal_arn(core.account_id, kind, name)).arn
    access_key_id = new_access_key_id(core.random(16))
    secret = new_secret(core.random(30))
    await add_access_key(core, arn, access_key_id, secret)
    return NewAccessKey(access_key_id, secret)


async def delete_access_key(core: ServiceCore, access_key_id: str) -> None:
    await core.commit(commands.DeleteAccessKey(access_key_id))


async def put_policy(core: ServiceCore, kind: str, name: str, policy_name: str,
                     document: str) -> None:
    arn = _existing(core, principal_arn(core.account_id, kind, name)).arn
    if not _POLICY_NAME.match(policy_name):
        raise ValidationException(f"Invalid policy name {policy_name!r}.")
    parse_policy(document, PolicyKind.IDENTITY)
    await core.commit(commands.PutPrincipalPolicy(arn, policy_name, document))


async def delete_policy(core: ServiceCore, kind: str, name: str, policy_name: str) -> None:
    await core.commit(commands.DeletePrincipalPolicy(
        principal_arn(core.account_id, kind, name), policy_name))
