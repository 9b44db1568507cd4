"""Limit / Marker / NextMarker / Truncated paging, as every KMS List operation does it.

A marker is opaque to callers: the listing's name and the sort key of the last
item returned, base64url-encoded. A marker that does not decode, or that was
made by another listing, is an InvalidMarkerException.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import TypeVar

from kmsd.errors import InvalidMarkerException

T = TypeVar("T")


def _encode(listing: str, last_key: str) -> str:
    return base64.urlsafe_b64encode(f"{listing}\x00{last_key}".encode()).decode()


def _decode(listing: str, marker: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(marker.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidMarkerException("Invalid marker.") from None
    name, sep, last_key = raw.partition("\x00")
    if not sep or name != listing:
        raise InvalidMarkerException("Invalid marker.")
    return last_key


def paginate(listing: str, items: Sequence[T], sort_key: Callable[[T], str],
             limit: int | None, marker: str | None,
             default_limit: int = 100) -> tuple[list[T], str | None]:
    """Items after `marker` in sort-key order, at most `limit` of them, and the next marker."""
    ordered = sorted(items, key=sort_key)
    if marker is not None:
        after = _decode(listing, marker)
        ordered = [item for item in ordered if sort_key(item) > after]
    page_size = limit if limit is not None else default_limit
    page = ordered[:page_size]
    if len(ordered) > page_size:
        return page, _encode(listing, sort_key(page[-1]))
    return page, None


def page_response(member: str, page: list[dict], next_marker: str | None) -> dict:
    response: dict = {member: page, "Truncated": next_marker is not None}
    if next_marker is not None:
        response["NextMarker"] = next_marker
    return response
