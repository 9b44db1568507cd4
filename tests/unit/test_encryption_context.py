"""Tests for kmsd.encryption_context: the canonical bytes bound into GCM as AAD.

Decrypt, EncryptionContext: "When you use an encryption context to encrypt data, you must
specify the same (an exact case-sensitive match) encryption context to decrypt the data."
So two contexts must give the same bytes exactly when they are equal.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from kmsd.encryption_context import canonical

# A small alphabet makes near-collisions (shared prefixes, swapped keys and values, pairs whose
# concatenations agree) common; the full text strategy covers multi-byte UTF-8.
small_text = st.text(alphabet="aA\x00é☃1", max_size=4)
any_text = st.text(max_size=12)
contexts = (st.dictionaries(small_text, small_text, max_size=5)
            | st.dictionaries(any_text, any_text, max_size=5))


def parse_canonical(data: bytes) -> dict[str, str]:
    """The inverse of canonical(): its existence is what makes canonical() injective."""
    (count,), offset = struct.unpack_from(">I", data), 4
    result: dict[str, str] = {}
    previous: bytes | None = None
    for _ in range(count):
        strings = []
        for _ in range(2):
            (length,), offset = struct.unpack_from(">I", data, offset), offset + 4
            strings.append(data[offset:offset + length])
            assert len(strings[-1]) == length
            offset += length
        key, value = strings
        assert previous is None or previous < key  # sorted by UTF-8 bytes, no duplicates
        previous = key
        result[key.decode("utf-8")] = value.decode("utf-8")
    assert offset == len(data)  # nothing after the last pair
    return result


@settings(max_examples=200, deadline=None)
@given(context=contexts)
def test_canonical_decodes_back_to_the_context(context: dict[str, str]) -> None:
    assert parse_canonical(canonical(context)) == context


@settings(max_examples=200, deadline=None)
@given(first=contexts, second=contexts)
def test_canonical_is_injective(first: dict[str, str], second: dict[str, str]) -> None:
    assert (canonical(first) == canonical(second)) == (first == second)


@settings(max_examples=100, deadline=None)
@given(data=st.data(), context=contexts)
def test_insertion_order_does_not_matter(data: st.DataObject, context: dict[str, str]) -> None:
    shuffled = dict(data.draw(st.permutations(list(context.items()))))
    assert shuffled == context
    assert canonical(shuffled) == canonical(context)


@settings(max_examples=100, deadline=None)
@given(context=st.dictionaries(small_text, small_text, min_size=1, max_size=4), data=st.data())
def test_any_single_change_changes_the_bytes(context: dict[str, str], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(context)))
    changed_value = dict(context, **{key: context[key] + "x"})
    without_key = {k: v for k, v in context.items() if k != key}
    renamed = dict(without_key, **{key + "x": context[key]})
    for other in (changed_value, without_key, renamed):
        assert other != context
        assert canonical(other) != canonical(context)


def test_empty_and_none_encode_the_same() -> None:
    assert canonical(None) == canonical({}) == b"\x00\x00\x00\x00"


def test_empty_strings_are_not_the_empty_context() -> None:
    assert canonical({"": ""}) != canonical({})
    assert canonical({"": ""}) == b"\x00\x00\x00\x01" + b"\x00" * 8


def test_known_bytes() -> None:
    assert canonical({"b": "2", "a": "1"}) == (
        b"\x00\x00\x00\x02"
        b"\x00\x00\x00\x01a\x00\x00\x00\x011"
        b"\x00\x00\x00\x01b\x00\x00\x00\x012")


def test_case_sensitive() -> None:
    # Decrypt, EncryptionContext: "(an exact case-sensitive match)"
    assert canonical({"Purpose": "test"}) != canonical({"purpose": "test"})
    assert canonical({"purpose": "Test"}) != canonical({"purpose": "test"})
    assert canonical({"purpose": "test"}) == canonical({"purpose": "test"})


def test_pair_boundaries_are_unambiguous() -> None:
    # Without length prefixes these would all concatenate to "abc".
    assert len({canonical({"ab": "c"}), canonical({"a": "bc"}), canonical({"abc": ""}),
                canonical({"": "abc"})}) == 4
    assert canonical({"a": "b"}) != canonical({"b": "a"})
    assert canonical({"a": "b", "c": "d"}) != canonical({"a": "bc", "": "d"})


def test_pairs_are_sorted_by_utf8_bytes_not_insertion_order() -> None:
    data = canonical({"é": "1", "z": "2", "Z": "3"})
    assert data.index(b"Z") < data.index(b"z") < data.index("é".encode())
