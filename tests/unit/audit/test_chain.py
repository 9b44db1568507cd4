"""Tests for kmsd.audit.chain: canonical encoding, the hash chain, and in-memory verification.

The chain runs inside the state machine's apply, so these drive it directly: same batches in,
byte-identical records out, no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from enum import StrEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.audit.chain import (
    GENESIS_HASH,
    GENESIS_HEAD,
    AuditChain,
    AuditEntry,
    CanonicalEncodingError,
    ChainedRecord,
    ChainHead,
    Problem,
    _header,
    canonical_bytes,
    record_hash,
    verify_records,
)
from tests.unit.audit.support import chained, sample_events

# -- canonical encoding ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53 - 1), 2**53 - 1) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


def test_canonical_form() -> None:
    value = {"b": [1, True, None], "a": {"z": "caf\u00e9 \U0001f511", "y": "tab\there"},
             "": "", "\u00e9": 0}
    assert canonical_bytes(value) == (
        b'{"":"","a":{"y":"tab\\there","z":"caf\\u00e9 \\ud83d\\udd11"},"b":[1,true,null],'
        b'"\\u00e9":0}')
    assert canonical_bytes(("x", 1)) == b'["x",1]'
    assert canonical_bytes("\ud800") == b'"\\ud800"'  # a lone surrogate still encodes


@pytest.mark.parametrize("bad", [1.5, float("nan"), float("inf"), b"blob", bytearray(b"x"),
                                 {1: "non-string key"}, 2**53, -(2**53), {"deep": [{"x": 0.1}]},
                                 object(), {"s": {1, 2}}])
def test_canonical_refuses_what_it_cannot_encode_exactly(bad: Any) -> None:
    with pytest.raises(CanonicalEncodingError) as raised:
        canonical_bytes(bad)
    assert "blob" not in str(raised.value)  # never echoes the value


def test_canonical_accepts_subclasses_of_json_types() -> None:
    class Color(StrEnum):
        RED = "red"

    assert canonical_bytes({"c": Color.RED}) == b'{"c":"red"}'


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_canonical_is_ascii_json_that_round_trips(value: Any) -> None:
    encoded = canonical_bytes(value)
    assert encoded.isascii() and b"\n" not in encoded  # one ASCII line, whatever the text
    assert json.loads(encoded) == value
    assert canonical_bytes(json.loads(encoded)) == encoded
    assert encoded == json.dumps(value, sort_keys=True, separators=(",", ":"),
                                 ensure_ascii=True).encode()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2**53 - 1), st.text(), st.booleans(),
       st.binary(min_size=32, max_size=32).map(bytes.hex))
def test_fast_header_equals_the_canonical_encoding(seq: int, node: str, revoked: bool,
                                                   prev: str) -> None:
    assert _header(seq, prev, node, revoked) == canonical_bytes(
        {"node": node, "prev_hash": prev, "revoked": revoked, "seq": seq})


# -- the chain ------------------------------------------------------------------------------------

KAT_EVENT = {"eventName": "Decrypt",
             "requestParameters": {"keyId": "k", "encryptionContext": {"caf\u00e9": "\U0001f511"}}}


def test_known_answer() -> None:
    # The documented construction, spelled out in bytes: a change of format must show here.
    records = AuditChain().append([AuditEntry.of(KAT_EVENT, "node-a"),
                                   AuditEntry.of({"eventName": "Encrypt"}, "node-b", True)])
    event_bytes = (b'{"eventName":"Decrypt","requestParameters":{"encryptionContext":'
                   b'{"caf\\u00e9":"\\ud83d\\udd11"},"keyId":"k"}}')
    header = (b'{"node":"node-a","prev_hash":"' + b"0" * 64
              + b'","revoked":false,"seq":1}')
    expected = hashlib.sha256(b"kmsd-audit-chain-v1\n" + header + b"\n" + event_bytes)
    assert records[0].event_bytes == event_bytes
    assert records[0].hash == expected.hexdigest()
    assert records[0].hash == "76ec00328b590fb0024d4c47d6c7287e0dd236bdf6f3f6b8b0b43f30ab9403c6"
    assert records[1].prev_hash == records[0].hash
    assert records[1].hash == "4d1eebad1bfe814ca41f1e1bf21ef9de0a201e72c1b6e2b6ef90f2c171d07a42"
    assert records[1].to_line() == (
        b'{"event":{"eventName":"Encrypt"},"hash":"' + records[1].hash.encode()
        + b'","node":"node-b","prev_hash":"' + records[0].hash.encode()
        + b'","revoked":true,"seq":2}\n')


def test_genesis() -> None:
    assert GENESIS_HASH == "0" * 64
    chain = AuditChain()
    assert chain.head == GENESIS_HEAD == ChainHead(0, GENESIS_HASH)
    first = chain.append([AuditEntry.of({"eventName": "Encrypt"}, "n")])[0]
    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert chain.head == ChainHead(1, first.hash)
    assert chain.append([]) == [] and chain.head == ChainHead(1, first.hash)


def test_same_events_give_the_same_chain_on_every_replica() -> None:
    entries = [AuditEntry.of(e, "node-a", i == 3) for i, e in enumerate(sample_events(9))]
    replicas = [AuditChain() for _ in range(3)]
    outputs = []
    for replica, batch_size in zip(replicas, (1, 4, 9), strict=True):
        records = []
        for start in range(0, len(entries), batch_size):
            records += replica.append(entries[start:start + batch_size])
        outputs.append(records)
    assert outputs[0] == outputs[1] == outputs[2]
    assert replicas[0].head == replicas[1].head == replicas[2].head
    assert [r.seq for r in outputs[0]] == list(range(1, 10))
    assert len({r.hash for r in outputs[0]}) == 9


@pytest.mark.parametrize("change", ["node", "revoked", "event_bytes", "seq", "prev_hash"])
def test_the_hash_covers_every_field(change: str) -> None:
    base = dict(seq=3, prev_hash="ab" * 32, node="node-a", revoked=False,
                event_bytes=canonical_bytes({"eventName": "Encrypt"}))
    changed = dict(base)
    changed[change] = {"node": "node-b", "revoked": True, "seq": 4, "prev_hash": "cd" * 32,
                       "event_bytes": canonical_bytes({"eventName": "Decrypt"})}[change]
    assert record_hash(**base) != record_hash(**changed)


def test_snapshot_resumes_the_same_chain() -> None:
    entries = [AuditEntry.of(e, "n") for e in sample_events(8)]
    whole = AuditChain()
    first, rest = whole.append(entries[:3]), whole.append(entries[3:])
    snapshot = AuditChain(ChainHead(3, first[-1].hash)).to_snapshot()
    assert snapshot == {"seq": 3, "hash": first[-1].hash}
    resumed = AuditChain.from_snapshot(snapshot)
    assert resumed.append(entries[3:]) == rest
    assert resumed.head == whole.head
    assert AuditChain.from_snapshot(AuditChain().to_snapshot()).head == GENESIS_HEAD
    for bad in ({"seq": -1, "hash": GENESIS_HASH}, {"seq": 1, "hash": "XYZ"},
                {"seq": True, "hash": GENESIS_HASH}):
        with pytest.raises(ValueError):
            AuditChain.from_snapshot(bad)


def test_a_bad_entry_leaves_the_head_where_it_was() -> None:
    chain = AuditChain()
    chain.append([AuditEntry.of({"eventName": "Encrypt"}, "n")])
    head = chain.head
    good = AuditEntry.of({"eventName": "Decrypt"}, "n")
    for bad in (AuditEntry(b'{"a":1}\n{"b":2}', "n"), AuditEntry(b"[1]", "n"),
                AuditEntry('{"a":1}', "n"),  # type: ignore[arg-type]
                AuditEntry(b'{"a":"\xc3\xa9"}', "n"), AuditEntry(b"{}", 7),  # type: ignore[arg-type]
                AuditEntry(b"{}", "n", revoked=1)):  # type: ignore[arg-type]
        with pytest.raises(CanonicalEncodingError):
            chain.append([good, bad])
        assert chain.head == head


def test_entries_refuse_floats_and_blobs() -> None:
    for event in ({"eventTime": 1669316263.5}, {"requestParameters": {"plaintext": b"x"}}):
        with pytest.raises(CanonicalEncodingError):
            AuditEntry.of(event, "n")


def test_record_json_round_trip() -> None:
    _, records = chained(5)
    for record in records:
        line = record.to_line()
        assert line == canonical_bytes(record.to_json_dict()) + b"\n"
        again = ChainedRecord.from_json_dict(json.loads(line))
        assert again == record and again.event == record.event
        assert record.event == json.loads(record.event_bytes)
    good = records[0].to_json_dict()
    for broken in ({**good, "seq": 0}, {**good, "seq": True}, {**good, "hash": "A" * 64},
                   {**good, "revoked": "no"}, {**good, "event": []}, {**good, "node": 1},
                   {k: v for k, v in good.items() if k != "node"}, {**good, "extra": 1}, []):
        with pytest.raises(ValueError):
            ChainedRecord.from_json_dict(broken)


def _line_by_definition(record: ChainedRecord) -> bytes:
    return canonical_bytes(record.to_json_dict()) + b"\n"


class _Node(StrEnum):
    CAFE = "caf\u00e9"


hex_hashes = st.binary(min_size=32, max_size=32).map(bytes.hex)
events = st.dictionaries(st.text(), json_values, max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 2**53 - 1), hex_hashes, hex_hashes,
       st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr)), st.booleans(), events)
def test_a_line_is_the_canonical_encoding_of_the_record(seq: int, digest: str, prev: str,
                                                        node: str, revoked: bool,
                                                        event: dict[str, Any]) -> None:
    # node covers every code point: quotes, backslashes, control characters, non-ASCII,
    # astral characters and lone surrogates, all of which must be escaped.
    record = ChainedRecord(seq, prev, digest, node, revoked, canonical_bytes(event))
    assert record.to_line() == _line_by_definition(record)


@pytest.mark.parametrize("change", [
    {"seq": 0}, {"seq": -3}, {"seq": True}, {"hash": 'not "hex"\n'}, {"prev_hash": None},
    {"revoked": None}, {"node": _Node.CAFE},
])
def test_a_line_of_unusual_values_is_still_the_canonical_encoding(change: dict[str, Any]
                                                                 ) -> None:
    # Values no chained record holds (link and from_json_dict never make them) are encoded
    # exactly as the general encoder does.
    _, records = chained(1)
    record = dataclasses.replace(records[0], **change)
    assert record.to_line() == _line_by_definition(record)


@pytest.mark.parametrize("change", [{"seq": 2**53}, {"seq": 1.0}, {"node": b"n"},
                                    {"hash": 7.5}, {"revoked": float("nan")}])
def test_a_line_of_unencodable_values_is_refused(change: dict[str, Any]) -> None:
    _, records = chained(1)
    with pytest.raises(CanonicalEncodingError):
        dataclasses.replace(records[0], **change).to_line()


# -- verification ---------------------------------------------------------------------------------

def test_a_good_chain_verifies() -> None:
    chain, records = chained(10)
    result = verify_records(records, expected_head=chain.head)
    assert result.ok and result.records == 10 and result.head == chain.head
    assert verify_records([]).ok
    # A suffix verifies from where it starts.
    assert verify_records(records[4:], start_prev_hash=records[3].hash, start_seq=5).ok
    assert not verify_records(records[4:]).ok


def test_tampered_content_is_a_hash_mismatch_at_that_record() -> None:
    _, records = chained(6)
    records[2] = dataclasses.replace(records[2], revoked=not records[2].revoked)
    result = verify_records(records)
    assert result.error is not None
    assert (result.error.problem, result.error.position, result.error.seq) == (
        Problem.HASH_MISMATCH, 2, 3)
    assert result.records == 2 and result.head.seq == 2


def test_a_broken_link_is_a_prev_hash_mismatch() -> None:
    _, records = chained(6)
    forged = dataclasses.replace(records[3], prev_hash="ee" * 32)
    records[3] = dataclasses.replace(forged, hash=forged.computed_hash())
    result = verify_records(records)
    assert result.error is not None
    assert (result.error.problem, result.error.position) == (Problem.PREV_HASH_MISMATCH, 3)


def test_removed_swapped_and_repeated_records() -> None:
    _, records = chained(8)
    gap = verify_records(records[:3] + records[4:]).error
    assert gap is not None
    assert (gap.problem, gap.position, gap.seq, gap.expected_seq) == (Problem.SEQ_GAP, 3, 5, 4)
    swapped = records[:2] + [records[5]] + records[3:5] + [records[2]] + records[6:]
    order = verify_records(swapped).error
    assert order is not None
    assert (order.problem, order.position, order.seq) == (Problem.SEQ_OUT_OF_ORDER, 2, 6)
    repeated = verify_records(records[:4] + records[3:]).error
    assert repeated is not None
    assert (repeated.problem, repeated.position, repeated.seq) == (
        Problem.SEQ_OUT_OF_ORDER, 4, 4)


def test_a_removed_tail_needs_the_expected_head() -> None:
    chain, records = chained(7)
    assert verify_records(records[:-2]).ok  # the chain alone cannot tell
    result = verify_records(records[:-2], expected_head=chain.head)
    assert result.error is not None
    assert (result.error.problem, result.error.position, result.error.expected_seq) == (
        Problem.HEAD_MISMATCH, 5, 6)
    beyond = verify_records(records, expected_head=ChainHead(5, records[4].hash)).error
    assert beyond is not None and beyond.problem is Problem.HEAD_MISMATCH
    wrong = verify_records(records, expected_head=ChainHead(7, "ff" * 32)).error
    assert wrong is not None and wrong.problem is Problem.HEAD_MISMATCH


N = 10
_, RECORDS = chained(N)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, N - 2))
def test_any_removed_record_is_named(index: int) -> None:
    error = verify_records(RECORDS[:index] + RECORDS[index + 1:]).error
    assert error is not None
    assert (error.problem, error.position, error.seq) == (Problem.SEQ_GAP, index, index + 2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, N - 1), min_size=2, max_size=2, unique=True).map(sorted))
def test_any_two_swapped_records_are_named(pair: list[int]) -> None:
    i, j = pair
    swapped = list(RECORDS)
    swapped[i], swapped[j] = swapped[j], swapped[i]
    error = verify_records(swapped).error
    assert error is not None
    assert (error.problem, error.position, error.seq) == (Problem.SEQ_OUT_OF_ORDER, i, j + 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, N - 1), st.text(min_size=1, max_size=5))
def test_any_changed_event_is_named(index: int, marker: str) -> None:
    changed = list(RECORDS)
    event = dict(changed[index].event, userAgent=changed[index].event["userAgent"] + marker)
    changed[index] = dataclasses.replace(changed[index], event_bytes=canonical_bytes(event))
    error = verify_records(changed).error
    assert error is not None
    assert (error.problem, error.position, error.seq) == (Problem.HASH_MISMATCH, index,
                                                          index + 1)
