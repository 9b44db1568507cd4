"""The audit record's fast paths against the plain implementations they replaced.

Every hash in the chain and every segment line is made of these bytes, so a faster path must
give exactly what the plain one gave -- the same text, the same bytes, or the same error -- on
any input. The plain versions live here, verbatim, as the reference.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.audit import record
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
