"""Frames between a node's primary process and its API workers, over a socketpair.

A frame is a 4-byte big-endian length, one byte naming its kind, and the body.
The socketpair is made by the primary and inherited by the worker it spawns,
so nothing else on the machine can reach either end.

Primary → worker:
- `SNAPSHOT`  msgpack [state snapshot, status]: the state as of the frame; the
  `APPLY` frames that follow continue from there;
- `APPLY`     a command exactly as the Raft log holds it, applied by the primary (but an
  audit batch);
- `USAGE`     msgpack [[key id, operation, event time, event id, request id], ...]: what
  an applied audit batch changed besides the chain, which workers do not keep (decoding
  every batch of the cluster in every worker would cost more than their requests);
- `STATUS`    msgpack status: {"not_ready": str | None, "has_leader": bool};
- `FENCE`     msgpack id: answer with `FENCED` once everything before is applied;
- `SERVE`     (empty) the answer to `READY`: every write answered from now on waits for
  this worker, and every write answered before is in a frame ahead of this one;
- `REPLY`     pickle (call id, ok, value): the answer to a `CALL`. Pickle goes
  only this way, from the process that spawned the reader. An "audit" call's value
  has, per record in the call's order, `committed_record`'s tuple or (error kind,
  message): the worker holds the event bytes and node it sent, so they do not come back.

Worker → primary (msgpack only; the primary never unpickles what a worker sends):
- `CALL`      [call id, name, args];
- `FENCED`    id;
- `READY`     (empty) it has its copy and is about to listen: wait for `SERVE` first;
- `OBSERVED`  [[[operation, outcome, row], ...], [[call, failed, row], ...]]: the requests
  and HSM calls it answered since its last such frame, for the node's metrics, as
  kmsd.metric_tally's histogram rows (a count per bucket, then the sum). Sent every
  half second when there are any, and ahead of every `FENCED`;
- `COUNTS`    msgpack {"cached_handles", "cache_hits", "cache_misses"}: its HSM handle
  cache, for the node's status and metrics (with the reports, when it changed).
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING, Any

from kmsd.audit.chain import ChainedRecord

if TYPE_CHECKING:
    from kmsd.audit.committer import AuditItem

SNAPSHOT = b"S"
APPLY = b"A"
USAGE = b"U"
STATUS = b"T"
FENCE = b"F"
REPLY = b"R"
CALL = b"C"
FENCED = b"f"
READY = b"r"
SERVE = b"s"
OBSERVED = b"O"
COUNTS = b"W"

# The first member of an "audit" reply's item for a committed record.
COMMITTED = "ok"

_LENGTH = struct.Struct(">I")
# A state snapshot of 100k keys is tens of MiB; anything past this is a broken peer.
MAX_FRAME_BYTES = 1 << 30


class FrameError(Exception):
    """The other end sent something that is not a frame."""


def frame(kind: bytes, body: bytes) -> bytes:
    return _LENGTH.pack(len(body) + 1) + kind + body


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next (kind, body); IncompleteReadError at the end of the stream."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if not 1 <= length <= MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes")
    data = await reader.readexactly(length)
    return data[:1], data[1:]


def committed_record(record: ChainedRecord) -> tuple[str, int, str, str, bool]:
    """A committed audit record as an "audit" REPLY carries it back to its worker."""
    return (COMMITTED, record.seq, record.prev_hash, record.hash, record.revoked)


def record_from_reply(reply: Any, item: AuditItem) -> ChainedRecord | None:
    """The record `committed_record` described, with the event bytes and node of `item`
    (what the worker sent for it); None for an error reply."""
    if reply[0] != COMMITTED:
        return None
    _, seq, prev_hash, digest, revoked = reply
    return ChainedRecord(seq, prev_hash, digest, item[1], revoked, item[0])
