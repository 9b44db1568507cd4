"""The audit record's fast paths against the plain implementations they replaced.

Every hash in the chain and every segment line is made of these bytes, so a faster path must
give exactly what the plain one gave -- the same text, the same bytes, or the same error -- on
any input. The plain versions live here, verbatim, as the reference.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.audit import record
from kmsd.audit.chain import CanonicalEncodingError, canonical_bytes, canonical_text
from kmsd.audit.record import EVENT_TIME_FORMAT, format_event_time

# -- event time -----------------------------------------------------------------------------------


def reference_format_event_time(epoch_seconds: float) -> str:
    if isinstance(epoch_seconds, bool) or not math.isfinite(epoch_seconds):
        raise ValueError(f"event time must be a finite number of seconds: {epoch_seconds!r}")
    return datetime.fromtimestamp(math.floor(epoch_seconds), UTC).strftime(EVENT_TIME_FORMAT)


def outcome(function: Any, *args: Any) -> tuple[str, Any]:
    """What a call gives: ("ok", result) or ("error", (type, message))."""
    try:
        return "ok", function(*args)
    except Exception as exc:  # any difference in errors is what this looks for
        return "error", (type(exc), str(exc))


# Near "now" (where the per-second cache lives), seconds apart, then anywhere datetime handles,
# and beyond it.
event_times = st.one_of(
    st.floats(1.7e9, 1.7e9 + 5, allow_nan=False),
    st.integers(1_700_000_000, 1_700_000_005),
    st.floats(-62_135_596_800, 253_402_300_799.99, allow_nan=False),
    st.integers(-62_135_596_800, 253_402_300_799),
    st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(event_times, min_size=1, max_size=12))
def test_event_time_equals_the_datetime_formatting(times: list[float]) -> None:
    # A sequence, repeats included, so cache hits and misses both meet the reference.
    for value in [*times, *times]:
        assert outcome(format_event_time, value) == outcome(reference_format_event_time, value)


def test_event_time_cache_follows_the_clock() -> None:
    record._last_event_time = (None, "")
    seen = [format_event_time(t) for t in (1669316263.0, 1669316263.99, 1669316264.0,
                                           1669316263.5, -0.5, -1, 0.0)]
    assert seen == ["2022-11-24T18:57:43Z", "2022-11-24T18:57:43Z", "2022-11-24T18:57:44Z",
                    "2022-11-24T18:57:43Z", "1969-12-31T23:59:59Z", "1969-12-31T23:59:59Z",
                    "1970-01-01T00:00:00Z"]
    with pytest.raises(ValueError):
        format_event_time(True)  # not a time, even though True == 1


# -- canonical encoding ---------------------------------------------------------------------------

MAX_SAFE_INT = 2**53 - 1


def reference_describe(value: Any, path: str) -> str:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"non-string key at {path}"
            found = reference_describe(item, f"{path}.{key}")
            if found:
                return found
        return ""
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = reference_describe(item, f"{path}[{index}]")
            if found:
                return found
        return ""
    if value is None or isinstance(value, str | bool):
        return ""
    if isinstance(value, int) and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return ""
    return f"{type(value).__name__} has no canonical encoding (at {path})"


def reference_check(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is dict:
            stack.extend(item.values())
            if not all(type(key) is str for key in item):
                break
        elif kind is list or kind is tuple:
            stack.extend(item)
        elif kind is int:
            if not -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                break
        else:
            break
    else:
        return
    problem = reference_describe(value, "$")
    if problem:
        raise CanonicalEncodingError(problem)


REFERENCE_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                                     allow_nan=False)


def reference_canonical_bytes(value: Any) -> bytes:
    reference_check(value)
    return REFERENCE_ENCODER.encode(value).encode("ascii")


class Color(StrEnum):
    RED = "red"
    NON_ASCII = "caf\u00e9"


class Size(IntEnum):
    SMALL = 1
    HUGE = 2**60


class Mapping(dict):  # type: ignore[type-arg]
    pass


class Items(list):  # type: ignore[type-arg]
    pass


# Text of every kind: ASCII, control characters, quotes and backslashes, any code point
# (the default alphabet has no surrogates), and now and then a lone surrogate.
texts = st.one_of(st.text(), st.text(alphabet=st.characters(max_codepoint=0x7F)),
                  st.text(alphabet='"\\\x00\x1f\x7f\u2028/<>&'),
                  st.sampled_from(["\ud800", "a\udfffb", "\U0001f511"]))
valid_leaves = st.one_of(st.none(), st.booleans(), st.integers(-MAX_SAFE_INT, MAX_SAFE_INT),
                         texts, st.sampled_from([Color.RED, Color.NON_ASCII, Size.SMALL]))
invalid_leaves = st.one_of(
    st.floats(), st.integers().filter(lambda n: abs(n) > MAX_SAFE_INT),
    st.sampled_from([2**53, -(2**53), Size.HUGE]), st.binary(max_size=4),
    st.just(bytearray(b"x")), st.just(object()), st.frozensets(st.integers(), max_size=2))


def json_like(leaves: Any, keys: Any) -> Any:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.lists(inner, max_size=3).map(tuple),
            st.lists(inner, max_size=3).map(Items),
            st.dictionaries(texts, inner, max_size=4),
            st.dictionaries(texts, inner, max_size=3).map(Mapping),
            st.dictionaries(keys, inner, max_size=3)),
        max_leaves=20)


valid_values = json_like(valid_leaves, texts)
mixed_values = json_like(st.one_of(valid_leaves, valid_leaves, invalid_leaves),
                         st.one_of(texts, texts, st.integers(), st.booleans(), st.none(),
                                   st.floats()))


@settings(max_examples=500, deadline=None)
@given(valid_values)
def test_canonical_bytes_equal_the_reference_on_valid_values(value: Any) -> None:
    expected = reference_canonical_bytes(value)
    assert canonical_bytes(value) == expected
    assert canonical_text(value) == expected.decode("ascii")


@settings(max_examples=1000, deadline=None)
@given(mixed_values)
def test_canonical_bytes_give_the_references_bytes_or_error(value: Any) -> None:
    assert outcome(canonical_bytes, value) == outcome(reference_canonical_bytes, value)
    assert outcome(canonical_text, value) == outcome(
        lambda v: reference_canonical_bytes(v).decode("ascii"), value)
