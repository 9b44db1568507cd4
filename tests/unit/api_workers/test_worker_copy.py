"""A worker's copy of the state (kmsd.api_workers): fed the same entries, it equals the
primary's replica in everything but the audit chain, which it does not keep; and the frames
that carry the feed survive any content and refuse broken lengths."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import commands as c
from cluster.state import Applied, KmsState, audit_usage
from kmsd.api_workers import wire
from kmsd.audit.chain import canonical_bytes
from tests.unit.cluster.test_state_machine import TIMES, key_ids, sequences

audit_entries = st.lists(st.tuples(
    st.integers(0, 9).map(lambda n: canonical_bytes({"eventName": "Decrypt", "n": n})),
    st.sampled_from(("node-1", "node-2")),
    st.lists(st.tuples(key_ids, st.integers(0, 3)), max_size=2).map(tuple),
    st.one_of(st.just(()), st.builds(
        lambda key, at, n: (key, "Decrypt", f"t{at}", f"e{n}", f"r{n}"),
        key_ids, TIMES, st.integers(0, 99)))), min_size=1, max_size=4)


@st.composite
def with_audit(draw: st.DrawFn) -> list[c.Command]:
    cmds = draw(sequences())
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, len(cmds)))
        cmds.insert(position, c.AppendAudit(tuple(draw(audit_entries))))
    return cmds


def _without_chain(state: KmsState) -> dict[str, Any]:
    """The snapshot but the chain (and the count of applied entries, which counts the audit
    batches a copy is not given)."""
    raw = msgpack.unpackb(state.to_snapshot())
    raw.pop("audit")
    raw.pop("applied_count")
    return raw


@settings(max_examples=60, deadline=None)
@given(with_audit())
def test_a_copy_fed_the_applied_entries_equals_the_replica_but_for_the_chain(
        cmds: list[c.Command]) -> None:
    replica, copy = KmsState(), KmsState()
    for cmd in cmds:
        result = replica.apply(cmd)
        if isinstance(cmd, c.AppendAudit):
            if isinstance(result, Applied):  # what the hub publishes (wire.USAGE)
                copy.note_key_usage(msgpack.unpackb(msgpack.packb(audit_usage(cmd,
                                                                               result.value))))
        else:
            copy.apply(cmd)
        assert _without_chain(copy) == _without_chain(replica)


def _read(data: bytes) -> list[tuple[bytes, bytes]]:
    async def read_all() -> list[tuple[bytes, bytes]]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        frames = []
        while True:
            try:
                frames.append(await wire.read_frame(reader))
            except asyncio.IncompleteReadError:
                return frames
    return asyncio.run(read_all())


@given(st.lists(st.tuples(st.sampled_from((wire.APPLY, wire.REPLY, wire.CALL, wire.FENCE)),
                          st.binary(max_size=300)), max_size=8))
def test_frames_come_out_as_they_went_in(frames: list[tuple[bytes, bytes]]) -> None:
    assert _read(b"".join(wire.frame(kind, body) for kind, body in frames)) == frames


@pytest.mark.parametrize("length", [0, wire.MAX_FRAME_BYTES + 1])
def test_a_frame_length_out_of_bounds_is_refused(length: int) -> None:
    with pytest.raises(wire.FrameError):
        _read(struct.pack(">I", length) + b"A")
