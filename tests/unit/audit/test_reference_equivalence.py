"""The audit record's fast paths against the plain implementations they replaced.

Every hash in the chain and every segment line is made of these bytes, so a faster path must
give exactly what the plain one gave -- the same text, the same bytes, or the same error -- on
any input. The plain versions live here, verbatim, as the reference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.audit import record
from kmsd.audit.chain import CanonicalEncodingError, canonical_bytes, canonical_text
from kmsd.audit.record import (
    CRYPTO_OPERATIONS,
    EVENT_TIME_FORMAT,
    REQUEST_MEMBERS,
    RESPONSE_MEMBERS,
    build_event,
    encode_event,
    format_event_time,
)
from tests.unit.audit.support import ACCOUNT, ALICE, KEY_ARN, OTHER_KEY_ARN, REGION
from tests.unit.audit.test_record_secrets import MODEL, OPERATIONS, Filler

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


# -- member names ---------------------------------------------------------------------------------


def reference_log_name(member: str) -> str:
    if member == "AWSAccountId":
        return member
    return member[:1].lower() + member[1:]


class Name(str):
    pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(sorted(REQUEST_MEMBERS) + sorted(RESPONSE_MEMBERS)
                                 + ["AWSAccountId", "CreationDate", "TagKey", "SourceArn"]),
                 st.text()).flatmap(lambda name: st.sampled_from([name, Name(name)])))
def test_log_names_equal_the_spelled_out_ones(member: str) -> None:
    expected = reference_log_name(member)
    spelled = record.log_name(member)
    assert spelled == expected and type(spelled) is type(expected)


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


# -- the event's bytes, built directly -----------------------------------------------------------


def reference_event_bytes(**arguments: Any) -> tuple[str, bytes]:
    """What _record did: build the event, take its dict, encode it canonically."""
    event = build_event(**arguments)
    return event.event_time, reference_canonical_bytes(event.to_dict())


@contextmanager
def no_plain_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail if encode_event falls back to building the event: prove the shortcut ran."""
    def refuse(**_: Any) -> Any:
        raise AssertionError("encode_event fell back to build_event")
    with monkeypatch.context() as patch:
        patch.setattr(record, "build_event", refuse)
        yield


def arguments(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        operation="Decrypt", params={"CiphertextBlob": b"\x01ct",
                                     "EncryptionContext": {"Dept": "Eng"}},
        response={"KeyId": KEY_ARN, "Plaintext": b"pt"}, error_code=None, error_message=None,
        principal_arn=ALICE, account_id=ACCOUNT, access_key_id="AKIDEXAMPLE", region=REGION,
        source_ip="192.0.2.0", user_agent="Boto3/1.40.0", request_id="req-1",
        event_id="evt-1", event_time=1669316263.75, key_arns=[KEY_ARN],
        recipient_account_id=ACCOUNT)
    return base | changes


TYPICAL = [
    arguments(),
    arguments(key_arns=(KEY_ARN,), recipient_account_id=None),
    arguments(error_code="AccessDeniedException", error_message="denied \u00e9", key_arns=[]),
    arguments(error_code="KMSInvalidStateException", error_message=None),
    arguments(operation="ReEncrypt", key_arns=[KEY_ARN, OTHER_KEY_ARN],
              params={"DestinationKeyId": "alias/other", "GrantTokens": ["t"]}),
    arguments(operation="CreateKey", params={"Description": "line\nbreak \"quoted\""},
              response={"KeyMetadata": {"KeyId": "k", "Arn": KEY_ARN, "Enabled": True,
                                        "CreationDate": datetime(2024, 1, 2, tzinfo=UTC)}}),
    arguments(operation="DisableKey", params={"KeyId": "k"}, response={}),
    arguments(operation="UnknownOperation", params={}, response=None, key_arns=[],
              principal_arn="", access_key_id="", error_code="UnknownOperationException",
              error_message=""),
    arguments(principal_arn=f"arn:aws:iam::{ACCOUNT}:root", principal_id="AIDAEXAMPLE",
              user_agent="caf\u00e9 \U0001f511 \x7f", region="\ud800"),
]


@pytest.mark.parametrize("case", range(len(TYPICAL)))
def test_typical_events_are_encoded_directly_and_exactly(
        case: int, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = reference_event_bytes(**TYPICAL[case])
    with no_plain_path(monkeypatch):
        assert encode_event(**TYPICAL[case]) == expected
        assert encode_event(**TYPICAL[case]) == expected  # again, from the caches


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_is_encoded_directly_and_exactly(
        operation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every member of the model filled in, blobs and sensitive strings included.
    filler = Filler(operation)
    model = MODEL.operation_model(operation)
    params = filler.fill(model.input_shape, f"{operation}.in") if model.input_shape else {}
    response = filler.fill(model.output_shape, f"{operation}.out") if model.output_shape else {}
    for changes in ({}, {"key_arns": []}, {"key_arns": [KEY_ARN, OTHER_KEY_ARN]},
                    {"response": None, "error_code": "AccessDeniedException",
                     "error_message": "denied"}):
        case = arguments(operation=operation, params=params, response=response) | changes
        expected = reference_event_bytes(**case)
        with no_plain_path(monkeypatch):
            assert encode_event(**case) == expected


# Generated arguments: what requests carry, and now and then one that nothing should carry.
odd = st.one_of(st.integers(), st.floats(), st.none(), st.binary(max_size=3), st.booleans(),
                st.sampled_from([Color.RED, 1, 1.0, True]))
member_values = st.recursive(
    st.one_of(texts, st.binary(max_size=4), st.integers(), st.booleans(), st.floats(),
              st.none(), st.datetimes(timezones=st.just(UTC)), st.sampled_from([Color.RED])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(texts, st.sampled_from(
                                sorted(REQUEST_MEMBERS) + ["TagKey", "TagValue"])),
                                inner, max_size=3)),
    max_leaves=8)
member_names = st.one_of(st.sampled_from(sorted(REQUEST_MEMBERS) + sorted(RESPONSE_MEMBERS)
                                         + ["CiphertextBlob", "Plaintext", "FutureMember"]),
                         texts)
members = st.dictionaries(member_names, member_values, max_size=5)
arns = st.one_of(st.sampled_from([KEY_ARN, OTHER_KEY_ARN, ALICE, f"arn:aws:iam::{ACCOUNT}:root",
                                  f"arn:aws:sts::{ACCOUNT}:assumed-role/r/s",
                                  "arn:aws:kms:us-east-1:444455556666:key/x",
                                  "arn:aws:kms:us-east-1::key/no-account"]), texts)
usual_arguments = st.fixed_dictionaries({
    "operation": st.one_of(st.sampled_from(sorted(CRYPTO_OPERATIONS) + [
        "CreateKey", "DisableKey", "DescribeKey", "ListKeys", "CreateAlias", "CreateGrant",
        "ScheduleKeyDeletion", "UnknownOperation"]), texts),
    "params": members,
    "response": st.one_of(st.none(), members),
    "error_code": st.one_of(st.none(), st.none(), texts),
    "error_message": st.one_of(st.none(), texts),
    "principal_arn": arns,
    "account_id": st.one_of(st.just(ACCOUNT), texts),
    "access_key_id": st.one_of(st.just("AKIDEXAMPLE"), texts),
    "region": texts,
    "source_ip": texts,
    "user_agent": texts,
    "request_id": texts,
    "event_id": texts,
    "event_time": st.one_of(st.floats(1.6e9, 1.8e9), st.integers(0, 2**33)),
    "key_arns": st.one_of(st.lists(arns, max_size=3), st.lists(arns, max_size=2).map(tuple)),
    "principal_id": st.one_of(st.none(), texts),
    "recipient_account_id": st.one_of(st.none(), texts),
})


@st.composite
def generated_arguments(draw: st.DrawFn) -> dict[str, Any]:
    case = draw(usual_arguments)
    if draw(st.integers(0, 3)) == 0:  # a quarter of the time, one argument of the wrong kind
        name = draw(st.sampled_from(sorted(case)))
        case[name] = draw(st.one_of(odd, st.lists(odd, max_size=2)) if name == "key_arns"
                          else odd)
    return case


@settings(max_examples=1000, deadline=None)
@given(st.lists(generated_arguments(), min_size=1, max_size=3))
def test_encode_event_gives_the_references_bytes_or_error(calls: list[dict[str, Any]]) -> None:
    # A few calls in a row, so the per-caller and per-key caches meet varied arguments.
    for case in calls:
        assert outcome(lambda c: encode_event(**c), case) == outcome(
            lambda c: reference_event_bytes(**c), case)


def test_equal_but_different_arguments_do_not_share_a_cached_encoding() -> None:
    # 1 == 1.0 == True, and hash alike: a cache keyed on them would mix them up.
    for account in (1, 1.0, True, "1", 1):
        case = arguments(account_id=account, key_arns=["arn:aws:kms:r::key/k"],
                         recipient_account_id="a")
        assert outcome(lambda c: encode_event(**c), case) == outcome(
            lambda c: reference_event_bytes(**c), case)
