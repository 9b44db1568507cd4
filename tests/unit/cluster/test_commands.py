"""Tests for cluster.commands: the msgpack encoding of replicated-log commands.

A log entry outlives the code that wrote it, so decoding must either rebuild the exact command
or refuse with CommandDecodeError; any other exception would crash pysyncobj's apply thread.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import commands as c

ALL_COMMANDS: dict[str, type[c.Command]] = {cls.op: cls for cls in c.Command.__subclasses__()}

_SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "str": st.text(),
    "bytes": st.binary(max_size=64),
    "bool": st.booleans(),
    "int": st.integers(-(2**63), 2**64 - 1),  # msgpack's integer range
}


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def type_strategy(annotation: str, *, allow_nan: bool = False) -> st.SearchStrategy[Any]:
    """A strategy for a field's annotation string (commands.py uses `from __future__ import
    annotations`, so dataclass field types are strings). Raises KeyError for a type it does not
    know, so that a command with a new kind of field cannot go untested."""
    annotation = annotation.strip()
    if annotation.endswith("| None"):
        return st.none() | type_strategy(annotation[: -len("| None")], allow_nan=allow_nan)
    if annotation == "float":
        return st.floats(allow_nan=allow_nan)
    if annotation.startswith("tuple[") and annotation.endswith("]"):
        items = _split_top_level(annotation[len("tuple["):-1])
        if len(items) == 2 and items[1] == "...":
            return st.lists(type_strategy(items[0], allow_nan=allow_nan), max_size=4).map(tuple)
        return st.tuples(*(type_strategy(item, allow_nan=allow_nan) for item in items))
    return _SCALARS[annotation]


def command_strategy(cls: type[c.Command], *, allow_nan: bool = False) -> st.SearchStrategy:
    kwargs = {f.name: type_strategy(str(f.type), allow_nan=allow_nan)
              for f in dataclasses.fields(cls)}
    return st.builds(cls, **kwargs)


any_command = st.sampled_from(sorted(ALL_COMMANDS)).flatmap(
    lambda op: command_strategy(ALL_COMMANDS[op]))

msgpack_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
                   | st.text(max_size=10) | st.binary(max_size=10))
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=12)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def decode_or_refuse(data: bytes) -> c.Command | None:
    """decode(), asserting it either returns a command or raises CommandDecodeError."""
    try:
        command = c.decode(data)
    except c.CommandDecodeError:
        return None
    assert isinstance(command, c.Command)
    return command


def wire(command: c.Command) -> dict[str, Any]:
    return msgpack.unpackb(c.encode(command), raw=False)


# --- round trips ------------------------------------------------------------------------------

def test_every_command_class_is_registered_and_covered() -> None:
    assert {"InitCluster", "RegisterNode", "PutAccessKey", "CreateKey", "SetKeyEnabled",
            "CreateAlias", "UpdateAlias", "DeleteAlias", "Barrier"} <= set(ALL_COMMANDS)
    assert set(ALL_COMMANDS) <= set(c._COMMANDS)
    for cls in ALL_COMMANDS.values():
        assert cls.op == cls.__name__
        for field in dataclasses.fields(cls):
            type_strategy(str(field.type))  # a new kind of field needs a strategy here


@pytest.mark.parametrize("op", sorted(ALL_COMMANDS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip_per_command_class(op: str, data: st.DataObject) -> None:
    command = data.draw(command_strategy(ALL_COMMANDS[op]))
    decoded = c.decode(c.encode(command))
    assert decoded == command
    assert type(decoded) is type(command)
    # Field types survive too (a list instead of a tuple would compare unequal above, but
    # bytes vs str or int vs float would not always).
    for field in dataclasses.fields(command):
        assert type(getattr(decoded, field.name)) is type(getattr(command, field.name))


@settings(max_examples=100, deadline=None)
@given(command=st.sampled_from(sorted(ALL_COMMANDS)).flatmap(
    lambda op: command_strategy(ALL_COMMANDS[op], allow_nan=True)))
def test_encoding_is_stable_including_nan_and_negative_zero(command: c.Command) -> None:
    encoded = c.encode(command)
    assert c.encode(c.decode(encoded)) == encoded
    assert c.encode(command) == encoded  # deterministic


def test_wire_format_is_op_version_args() -> None:
    command = c.SetKeyEnabled(key_id="k", enabled=False, at=1.5)
    assert wire(command) == {"op": "SetKeyEnabled", "v": c.SCHEMA_VERSION,
                             "args": {"key_id": "k", "enabled": False, "at": 1.5}}


def test_tags_round_trip_as_tuple_of_pairs() -> None:
    command = c.CreateKey(key_id="k", region="r", account_id="a", description="d",
                          key_usage="ENCRYPT_DECRYPT", key_spec="SYMMETRIC_DEFAULT",
                          origin="AWS_KMS", policy="{}", tags=(("Ünï", "☃"), ("", "")),
                          wrapped_backing_key=b"\x00\xff", at=0.1)
    decoded = c.decode(c.encode(command))
    assert decoded == command
    assert decoded.tags == (("Ünï", "☃"), ("", ""))
    assert c.decode(c.encode(dataclasses.replace(command, tags=()))).tags == ()


def test_decode_reads_every_version_up_to_its_own_and_no_other() -> None:
    # "a node decodes entries written by older nodes through the version number";
    # version 1 is the first schema, so 0, negatives and booleans never were one.
    raw = wire(c.Barrier())
    for version in range(1, c.SCHEMA_VERSION + 1):
        raw["v"] = version
        assert c.decode(pack(raw)) == c.Barrier()
    for version in (0, -1, True, c.SCHEMA_VERSION + 1):
        raw["v"] = version
        with pytest.raises(c.CommandDecodeError):
            c.decode(pack(raw))


# --- refusal ----------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_decode_of_arbitrary_bytes_raises_only_command_decode_error(data: bytes) -> None:
    decode_or_refuse(data)


@settings(max_examples=200, deadline=None)
@given(value=msgpack_values)
def test_decode_of_arbitrary_msgpack_values_raises_only_command_decode_error(value: Any) -> None:
    decode_or_refuse(pack(value))


@settings(max_examples=100, deadline=None)
@given(op=st.sampled_from(sorted(ALL_COMMANDS)) | st.text(max_size=12) | msgpack_scalars,
       version=st.integers(-(2**63), 2**64 - 1) | msgpack_scalars,
       args=st.dictionaries(st.text(max_size=12), msgpack_values, max_size=6))
def test_decode_of_arbitrary_command_maps_raises_only_command_decode_error(
        op: Any, version: Any, args: dict[str, Any]) -> None:
    decode_or_refuse(pack({"op": op, "v": version, "args": args}))


@settings(max_examples=50, deadline=None)
@given(command=any_command, junk=st.binary(min_size=1, max_size=8))
def test_trailing_bytes_are_refused(command: c.Command, junk: bytes) -> None:
    with pytest.raises(c.CommandDecodeError):
        c.decode(c.encode(command) + junk)


@settings(max_examples=50, deadline=None)
@given(command=any_command, cut=st.integers(min_value=1))
def test_truncated_entries_are_refused(command: c.Command, cut: int) -> None:
    encoded = c.encode(command)
    with pytest.raises(c.CommandDecodeError):
        c.decode(encoded[: len(encoded) - 1 - cut % len(encoded)])


@pytest.mark.parametrize("op", ["", "Command", "NoSuchCommand", "barrier", "_apply_Barrier"])
def test_unknown_op_is_refused(op: str) -> None:
    with pytest.raises(c.CommandDecodeError, match="not a kmsd command"):
        c.decode(pack({"op": op, "v": 1, "args": {}}))


@settings(max_examples=50, deadline=None)
@given(command=any_command, version=st.integers(c.SCHEMA_VERSION + 1, 2**64 - 1))
def test_newer_schema_version_is_refused(command: c.Command, version: int) -> None:
    raw = wire(command)
    raw["v"] = version
    with pytest.raises(c.CommandDecodeError, match="newer than this node"):
        c.decode(pack(raw))


@pytest.mark.parametrize("version", ["1", 1.0, None, [1], {"v": 1}, b"\x01"])
def test_non_integer_schema_version_is_refused(version: Any) -> None:
    with pytest.raises(c.CommandDecodeError):
        c.decode(pack({"op": "Barrier", "v": version, "args": {}}))


@pytest.mark.parametrize("missing", ["op", "v", "args"])
def test_missing_envelope_member_is_refused(missing: str) -> None:
    raw = {"op": "Barrier", "v": 1, "args": {}}
    del raw[missing]
    with pytest.raises(c.CommandDecodeError):
        c.decode(pack(raw))


@pytest.mark.parametrize("op", sorted(op for op, cls in ALL_COMMANDS.items()
                                      if dataclasses.fields(cls)))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_renamed_argument_is_refused(op: str, data: st.DataObject) -> None:
    raw = wire(data.draw(command_strategy(ALL_COMMANDS[op])))
    name = data.draw(st.sampled_from(sorted(raw["args"])))
    raw["args"][name + "_renamed"] = raw["args"].pop(name)
    with pytest.raises(c.CommandDecodeError, match=f"malformed {op} command"):
        c.decode(pack(raw))


@pytest.mark.parametrize("op", sorted(op for op, cls in ALL_COMMANDS.items()
                                      if dataclasses.fields(cls)))
def test_missing_argument_is_refused(op: str) -> None:
    with pytest.raises(c.CommandDecodeError, match=f"malformed {op} command"):
        c.decode(pack({"op": op, "v": 1, "args": {}}))


@pytest.mark.parametrize("args", [None, [], "x", 1, b"", [["key_id", "k"]]])
def test_non_map_args_are_refused(args: Any) -> None:
    with pytest.raises(c.CommandDecodeError):
        c.decode(pack({"op": "Barrier", "v": 1, "args": args}))


@pytest.mark.parametrize("command", [c.Barrier(), c.DeleteAlias(region="r", alias_name="a")])
def test_unknown_extra_argument_is_refused(command: c.Command) -> None:
    raw = wire(command)
    raw["args"]["deletion_date"] = 1.0
    with pytest.raises(c.CommandDecodeError):
        c.decode(pack(raw))


def test_nan_floats_stay_nan() -> None:
    decoded = c.decode(c.encode(c.SetKeyEnabled(key_id="k", enabled=True, at=math.nan)))
    assert isinstance(decoded, c.SetKeyEnabled)
    assert math.isnan(decoded.at)


def _lists(value: Any) -> Any:
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


@settings(max_examples=100, deadline=None)
@given(command=st.sampled_from(sorted(ALL_COMMANDS)).flatmap(
    lambda op: command_strategy(ALL_COMMANDS[op])))
def test_tuples_are_packed_as_the_arrays_lists_would_be(command: c.Command) -> None:
    # The log holds entries encoded when tuples were turned into lists first: the bytes must
    # not change, or replicas of different versions would disagree on what was proposed.
    args = {f.name: _lists(getattr(command, f.name)) for f in dataclasses.fields(command)}
    assert c.encode(command) == msgpack.packb(
        {"op": command.op, "v": c.SCHEMA_VERSION, "args": args}, use_bin_type=True)
