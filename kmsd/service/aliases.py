"""Aliases: CreateAlias, UpdateAlias, DeleteAlias, ListAliases."""

from __future__ import annotations

from typing import Any

from cluster import commands
from cluster.state import AliasRecord, alias_arn
from kmsd.errors import InvalidAliasNameException, NotFoundException
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.pagination import page_response, paginate

_RESERVED_PREFIX = "alias/aws/"


def _check_alias_name(name: str) -> None:
    if not name.startswith("alias/") or name == "alias/":
        raise InvalidAliasNameException(f"Alias must start with the prefix \"alias/\": {name}")
    if name.startswith(_RESERVED_PREFIX):
        raise InvalidAliasNameException(
            f"Alias {name} cannot begin with alias/aws/; that prefix is reserved for AWS managed"
            " keys.")


async def create_alias(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    name = params["AliasName"]
    _check_alias_name(name)
    target = await core.authorized_key(ctx, "CreateAlias", params, params["TargetKeyId"],
                                       allow_alias=False)
    await core.commit(commands.CreateAlias(ctx.region, name, target.key_id, core.clock.now()))
    return {}


async def update_alias(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    name = params["AliasName"]
    _check_alias_name(name)
    target = await core.authorized_key(ctx, "UpdateAlias", params, params["TargetKeyId"],
                                       allow_alias=False)
    await core.commit(commands.UpdateAlias(ctx.region, name, target.key_id, core.clock.now()))
    return {}


async def delete_alias(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    name = params["AliasName"]
    _check_alias_name(name)
    if (ctx.region, name) not in core.state.aliases:
        await core.catch_up()
    alias = core.state.aliases.get((ctx.region, name))
    if alias is None:
        raise NotFoundException(
            f"Alias {alias_arn(ctx.region, core.account_id, name)} is not found.")
    await core.authorized_key(ctx, "DeleteAlias", params, alias.target_key_id)
    await core.commit(commands.DeleteAlias(ctx.region, name))
    return {}


def _alias_entry(alias: AliasRecord, account_id: str) -> dict[str, Any]:
    return {
        "AliasName": alias.alias_name,
        "AliasArn": alias_arn(alias.region, account_id, alias.alias_name),
        "TargetKeyId": alias.target_key_id,
        "CreationDate": alias.created_at,
        "LastUpdatedDate": alias.updated_at,
    }


async def list_aliases(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    aliases = [a for a in list(core.state.aliases.values()) if a.region == ctx.region]
    await core.authorize(ctx, "ListAliases", None, params)
    if "KeyId" in params:
        record = await core.find_key(ctx, params["KeyId"], allow_alias=False)
        aliases = [a for a in aliases if a.target_key_id == record.key_id]
    page, next_marker = paginate("ListAliases", aliases, lambda a: a.alias_name,
                                 params.get("Limit"), params.get("Marker"), default_limit=50)
    return page_response("Aliases", [_alias_entry(a, core.account_id) for a in page],
                         next_marker)
