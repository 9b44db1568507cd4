"""The request tallies an API worker sends its primary: what a merge takes and refuses."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kmsd.metric_tally import RequestTallies
from kmsd.metrics import HSM_BUCKETS, LATENCY_BUCKETS


def _tallies() -> RequestTallies:
    return RequestTallies(LATENCY_BUCKETS, HSM_BUCKETS)


def _state(tallies: RequestTallies) -> tuple[dict, dict]:
    return tallies.requests.copy(), tallies.hsm.copy()


def test_a_value_on_a_bound_counts_in_that_bucket_and_past_the_last_in_inf() -> None:
    tallies = _tallies()
    tallies.observe_request("Decrypt", "ok", LATENCY_BUCKETS[0])
    tallies.observe_request("Decrypt", "ok", LATENCY_BUCKETS[-1] + 1)
    row = tallies.requests.rows[("Decrypt", "ok")]
    assert row[0] == 1 and row[len(LATENCY_BUCKETS)] == 1 and sum(row[:-1]) == 2
    assert row[-1] == pytest.approx(LATENCY_BUCKETS[0] + LATENCY_BUCKETS[-1] + 1)


def _good_body() -> list:
    sender = _tallies()
    sender.observe_request("Decrypt", "ok", 0.003)
    sender.observe_hsm("decrypt", 0.0001, True)
    body = sender.take_wire()
    assert body is not None
    return msgpack.unpackb(msgpack.packb(body))


_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False)
    | st.text(max_size=3) | st.binary(max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=2), inner, max_size=2), max_leaves=20)


@settings(max_examples=300)
@given(_junk)
@example(["", ""])  # empty strings iterate as empty lists would
@example([["abc"], []])  # a str would unpack into three labels
def test_a_body_of_another_shape_is_refused_and_changes_nothing(body) -> None:
    tallies = _tallies()
    tallies.merge_wire(_good_body())
    before = _state(tallies)
    try:
        tallies.merge_wire(body)
    except (TypeError, ValueError):
        assert _state(tallies) == before
    else:  # only an empty report gets through
        assert type(body) in (list, tuple) and len(body) == 2
        assert all(type(part) in (list, tuple) and not part for part in body)
        assert _state(tallies) == before


@pytest.mark.parametrize("spoil", [
    lambda b: b[0][0].__setitem__(2, b[0][0][2][:-2] + [b[0][0][2][-1]]),  # a row too short
    lambda b: b[0][0][2].__setitem__(0, -1),            # a negative count
    lambda b: b[0][0][2].__setitem__(1, 0.5),           # a count that is not an int
    lambda b: b[1][0].__setitem__(1, "yes"),            # failed is not a bool
    lambda b: b[0][0].__setitem__(0, 7),                # an operation that is not a str
])
def test_one_bad_row_spoils_the_whole_report(spoil) -> None:
    tallies = _tallies()
    body = _good_body()
    body[0].append(["Encrypt", "ok", list(body[0][0][2])])  # a good row beside the bad one
    spoil(body)
    with pytest.raises((TypeError, ValueError)):
        tallies.merge_wire(body)
    assert _state(tallies) == ({}, {})
