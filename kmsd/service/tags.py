"""Tags: TagResource, UntagResource, ListResourceTags (and the rules CreateKey shares)."""

from __future__ import annotations

from typing import Any

from cluster import commands
from kmsd.errors import TagException
from kmsd.service.context import RequestContext
from kmsd.service.core import ServiceCore
from kmsd.service.pagination import page_response, paginate

MAX_TAGS_PER_KEY = 50
_RESERVED_PREFIX = "aws:"


def checked_tags(tags: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    """Tag pairs from a request, refusing what AWS refuses before anything is stored."""
    keys = [t["TagKey"] for t in tags]
    if len(set(keys)) != len(keys):
        raise TagException("Duplicate tag keys in the request.")
    for key in keys:
        if key.lower().startswith(_RESERVED_PREFIX):
            raise TagException(f"Tag keys beginning with {_RESERVED_PREFIX} are reserved: {key}")
    return tuple((t["TagKey"], t["TagValue"]) for t in tags)


async def tag_resource(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "TagResource", params, allow_alias=False)
    await core.commit(commands.TagKey(record.key_id, checked_tags(params["Tags"]),
                                      MAX_TAGS_PER_KEY))
    return {}


async def untag_resource(core: ServiceCore, ctx: RequestContext, params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "UntagResource", params, allow_alias=False)
    await core.commit(commands.UntagKey(record.key_id, tuple(params["TagKeys"])))
    return {}


async def list_resource_tags(core: ServiceCore, ctx: RequestContext,
                             params: dict[str, Any]) -> dict:
    record = await core.authorized_key(ctx, "ListResourceTags", params, allow_alias=False)
    page, next_marker = paginate("ListResourceTags", list(record.tags), lambda t: t[0],
                                 params.get("Limit"), params.get("Marker"), default_limit=50)
    return page_response("Tags", [{"TagKey": k, "TagValue": v} for k, v in page], next_marker)
