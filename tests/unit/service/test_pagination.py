"""Tests for kmsd.service.pagination: Limit / Marker / NextMarker / Truncated paging.

ListKeys, Limit: "When this value is present, KMS does not return more than the specified
number of items, but it might return fewer. ... If you include a value, it must be between 1
and 1000, inclusive. If you do not include a value, it defaults to 100."
ListKeys, Truncated: "When this value is true, the list in this response is truncated. To get
more items, pass the value of the NextMarker element in this response to the Marker parameter
in a subsequent request."
ListKeys, NextMarker: "When Truncated is true, this element is present and contains the value
to use for the Marker parameter in a subsequent request."
"""

from __future__ import annotations

import base64
import binascii
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kmsd.errors import InvalidMarkerException, KmsError
from kmsd.service.pagination import page_response, paginate

LISTING = "ListKeys"

unique_keys = st.lists(st.text(max_size=8), unique=True, max_size=60)
limits = st.integers(1, 10) | st.integers(1, 1000)


def page_through(items: list[str], limit: int | None, listing: str = LISTING) -> list[list[str]]:
    """Every page of a listing, checking each response's Truncated / NextMarker."""
    pages: list[list[str]] = []
    marker: str | None = None
    while True:
        page, next_marker = paginate(listing, items, lambda s: s, limit, marker)
        response = page_response("Keys", [{"KeyId": k} for k in page], next_marker)
        assert response["Keys"] == [{"KeyId": k} for k in page]
        assert response["Truncated"] is (next_marker is not None)
        assert ("NextMarker" in response) is response["Truncated"]
        assert set(response) <= {"Keys", "Truncated", "NextMarker"}
        page_size = limit if limit is not None else 100
        assert len(page) <= page_size
        pages.append(page)
        if not response["Truncated"]:
            return pages
        # A truncated page is a full page (nothing is lost by returning fewer, but an empty
        # truncated page would be a loop).
        assert len(page) == page_size
        assert response["NextMarker"] == next_marker
        marker = response["NextMarker"]
        assert len(pages) <= len(items) + 1, "paging does not terminate"


def assert_invalid_marker(listing: str, marker: str) -> None:
    with pytest.raises(KmsError) as info:
        paginate(listing, ["a", "b"], lambda s: s, None, marker)
    assert info.value.error_type == "InvalidMarkerException"
    assert isinstance(info.value, InvalidMarkerException)
    assert info.value.http_status == 400


@settings(max_examples=150, deadline=None)
@given(items=unique_keys, limit=limits)
def test_paging_yields_every_item_once_in_order(items: list[str], limit: int) -> None:
    pages = page_through(items, limit)
    assert [k for page in pages for k in page] == sorted(items)
    assert len(pages) == max(1, math.ceil(len(items) / limit))
    assert all(pages) or pages == [[]]  # no empty page unless the list is empty


@settings(max_examples=15, deadline=None)
@given(numbers=st.sets(st.integers(0, 10**6), max_size=350))
def test_default_limit_is_100(numbers: set[int]) -> None:
    items = [f"{n:07d}" for n in numbers]
    pages = page_through(items, None)
    assert [k for page in pages for k in page] == sorted(items)
    assert [len(p) for p in pages[:-1]] == [100] * (len(pages) - 1)


def test_exact_multiple_of_the_limit_ends_without_an_empty_page() -> None:
    pages = page_through([str(n) for n in range(10)], 5)
    assert [len(p) for p in pages] == [5, 5]


def test_empty_listing() -> None:
    assert paginate(LISTING, [], lambda s: s, None, None) == ([], None)
    assert page_response("Keys", [], None) == {"Keys": [], "Truncated": False}


def test_custom_default_limit() -> None:
    page, marker = paginate(LISTING, list("abcdef"), lambda s: s, None, None, default_limit=4)
    assert page == list("abcd")
    assert marker is not None


@settings(max_examples=50, deadline=None)
@given(items=st.lists(st.text(max_size=8), unique=True, min_size=2, max_size=30),
       limit=st.integers(1, 10))
def test_marker_names_the_last_key_not_an_offset(items: list[str], limit: int) -> None:
    # Between pages, a key added after the marker is returned; removing a key already
    # returned shifts nothing.
    ordered = sorted(items)
    _, marker = paginate(LISTING, ordered, lambda s: s, limit, None)
    assume(marker is not None)
    added = ordered[-1] + "\x00"
    rest, _ = paginate(LISTING, ordered[1:] + [added], lambda s: s, 1000, marker)
    assert rest == ordered[limit:] + [added]


@settings(max_examples=50, deadline=None)
@given(items=st.lists(st.text(max_size=8), unique=True, min_size=2, max_size=20))
def test_marker_from_another_listing_is_invalid(items: list[str]) -> None:
    _, marker = paginate("ListAliases", items, lambda s: s, 1, None)
    assert marker is not None
    assert_invalid_marker(LISTING, marker)
    assert_invalid_marker("ListKey", marker)  # a prefix of the other listing's name


@pytest.mark.parametrize("marker", [
    "", "!!!!", "abc", "a", "====", "é", "ListKeys", "ListKeys\x00a",
    base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),       # not UTF-8
    base64.urlsafe_b64encode(b"ListKeys").decode(),           # no separator
    base64.urlsafe_b64encode(b"ListAliases\x00a").decode(),   # another listing
    base64.urlsafe_b64encode(b"listkeys\x00a").decode(),      # listing names are exact
    base64.urlsafe_b64encode(b"\x00ListKeys\x00a").decode(),
])
def test_garbage_markers_are_invalid(marker: str) -> None:
    # InvalidMarkerException: "the marker that specifies where pagination should next begin
    # is not valid."
    assert_invalid_marker(LISTING, marker)


def _decodes_to_this_listing(marker: str) -> bool:
    try:
        raw = base64.urlsafe_b64decode(marker.encode("ascii"))
    except (binascii.Error, UnicodeError, ValueError):
        return False
    return raw.startswith(LISTING.encode() + b"\x00")


@settings(max_examples=300, deadline=None)
@given(marker=st.text(max_size=40) | st.text(alphabet="ABCabc012-_=+/", max_size=40))
def test_arbitrary_markers_are_invalid(marker: str) -> None:
    assume(not _decodes_to_this_listing(marker))
    assert_invalid_marker(LISTING, marker)


def test_marker_past_the_end_gives_an_empty_last_page() -> None:
    _, marker = paginate(LISTING, ["a", "b"], lambda s: s, 1, None)
    assert marker is not None
    assert paginate(LISTING, ["a"], lambda s: s, 1, marker) == ([], None)
