"""Canonical encoding of audit records and the SHA-256 hash chain over them.

Owns: `canonical_bytes`, `ChainedRecord` (one event with its place in the chain), the chain head
(`ChainHead`, `AuditChain`) and chain verification (`verify_records`, `verify_scanned`).

Never does: read a clock, draw a random number or do I/O. `AuditChain.append` runs inside the
replicated state machine's apply, so every replica must turn the same batch into byte-identical
records. It hashes events `record.build_event` made and never sees plaintext or a secret.

Canonical encoding (`canonical_bytes`), the bytes every hash and every segment line is made of:
- JSON (RFC 8259); object keys sorted by Unicode code point; no whitespace (separators `,` `:`);
- strings escaped the way Python's `json.dumps(ensure_ascii=True)` does: `\\"`, `\\\\`, `\\n`,
  `\\r`, `\\t`, `\\b`, `\\f`; other characters below U+0020 and every non-ASCII character as
  `\\uXXXX` (lowercase hex; characters beyond the BMP as a UTF-16 surrogate pair); everything
  else literal. The output is therefore pure ASCII and so also UTF-8. Escaping rather than raw
  UTF-8 keeps lone surrogates -- which a JSON request can carry into an encryption context --
  encodable, so apply cannot fail on them on one replica and not another.
- values: objects with string keys, arrays (tuples encode as arrays), strings, true, false, null
  and integers in [-(2**53 - 1), 2**53 - 1]. **No floats at all**: events carry times as ISO-8601
  strings, and the encoder refuses a float (or NaN, bytes, anything else) with
  `CanonicalEncodingError` instead of depending on a float-formatting algorithm.
It equals `json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
allow_nan=False)` for such values.

The chain:
- Each record carries its event as canonical bytes (`event_bytes`), encoded once by the
  proposer (`AuditEntry.of`; API calls use `record.encode_event`, the same bytes built directly)
  and carried in the Raft command, so apply never JSON-encodes an event: it hashes a small
  header and those bytes.
- `hash = SHA-256(b"kmsd-audit-chain-v1\\n" || canonical({"node", "prev_hash", "revoked",
  "seq"}) || b"\\n" || event_bytes)`, lowercase hex. It covers the sequence number, the
  previous record's hash, the node that served the request, the commit-time revocation flag
  and the event's canonical bytes. The header's canonical form never contains a raw newline,
  so the concatenation is unambiguous.
- The first record has seq 1 and prev_hash `GENESIS_HASH` (64 zeros); record n+1 has seq n+1
  and prev_hash = hash of record n.
- A record as a segment line: canonical({"event", "hash", "node", "prev_hash", "revoked",
  "seq"}) followed by `\\n` -- which, keys being sorted, is `{"event":` + event_bytes + the
  rest, so the writer splices the bytes in rather than re-encoding the event.

Threading: `AuditChain.head` is replaced whole (one attribute store of a frozen `ChainHead`),
so a reader on another thread sees the old head or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from json.encoder import c_make_encoder, encode_basestring_ascii
from typing import Any

GENESIS_HASH = "0" * 64
HASH_DOMAIN = b"kmsd-audit-chain-v1\n"
MAX_SAFE_INT = 2**53 - 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = frozenset({"event", "hash", "node", "prev_hash", "revoked", "seq"})


class CanonicalEncodingError(ValueError):
    """A value that has no canonical encoding (a float, bytes, a non-string key, ...)."""


def _describe(value: Any, path: str) -> str:
    """Where in `value` the first value without a canonical encoding is (the slow path)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"non-string key at {path}"
            found = _describe(item, f"{path}.{key}")
            if found:
                return found
        return ""
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _describe(item, f"{path}[{index}]")
            if found:
                return found
        return ""
    if value is None or isinstance(value, str | bool):
        return ""
    if isinstance(value, int) and -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        return ""
    # Never echo the value: it could be a blob that should not have been here.
    return f"{type(value).__name__} has no canonical encoding (at {path})"


_STR_ONLY = frozenset({str})


def _check(value: Any) -> None:
    """Raise CanonicalEncodingError unless `value` holds only canonical JSON types."""
    # Exact types only here, the common case, decided cheaply; anything else (a subclass, or
    # something unencodable) goes to _describe, which is the definition.
    stack = [value]
    pop, extend, keys_are_str = stack.pop, stack.extend, _STR_ONLY.issuperset
    while stack:
        item = pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is dict:
            extend(item.values())
            if not keys_are_str(map(type, item)):
                break
        elif kind is list or kind is tuple:
            extend(item)
        elif kind is int:
            if not -MAX_SAFE_INT <= item <= MAX_SAFE_INT:
                break
        else:
            break  # floats, bytes, subclasses: decide on the slow path
    else:
        return
    problem = _describe(value, "$")
    if problem:
        raise CanonicalEncodingError(problem)
    # Only subclasses of the JSON types (a StrEnum, say) got here: they encode like their base.


# The options that give the canonical form. json.dumps with options builds a new encoder per
# call, and even a shared JSONEncoder's encode() builds its C encoder (and a cycle-check dict)
# on every call, which costs about as much as encoding a small event: build the C encoder once.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                            allow_nan=False)
if c_make_encoder is not None:
    # Same arguments JSONEncoder.iterencode passes for these options, but no cycle check
    # (markers None): _check has walked the whole value first, and it never finishes on a
    # cyclic one, so what gets here is finite and the check could never fire.
    _encode_chunks = c_make_encoder(None, _ENCODER.default, encode_basestring_ascii, None,
                                    _ENCODER.key_separator, _ENCODER.item_separator,
                                    True, False, False)

    def _encode(value: Any) -> str:
        return "".join(_encode_chunks(value, 0))
else:  # no C accelerator: the pure-Python encoder, same output
    _encode = _ENCODER.encode


def canonical_text(value: Any) -> str:
    """`canonical_bytes(value)` as a str (ASCII only): for building a larger encoding."""
    _check(value)
    return _encode(value)


def canonical_bytes(value: Any) -> bytes:
    """The canonical encoding of a JSON-like value (see the module docstring)."""
    _check(value)
    return _encode(value).encode("ascii")


def check_event_bytes(event_bytes: bytes) -> None:
    """Cheap shape checks on pre-encoded event bytes (apply cannot afford to re-encode): an
    ASCII JSON object on one line. The proposer's `AuditEntry.of` guarantees the rest."""
    if (type(event_bytes) is not bytes or not event_bytes.isascii()
            or not event_bytes.startswith(b"{") or not event_bytes.endswith(b"}")
            or b"\n" in event_bytes):
        raise CanonicalEncodingError("event bytes are not a one-line ASCII JSON object")


def _header(seq: int, prev_hash: str, node: str, revoked: bool) -> bytes:
    """canonical_bytes({"node", "prev_hash", "revoked", "seq"}), formatted directly: this runs
    once per record inside apply, and the general encoder costs several times more. prev_hash
    is always 64 hex digits here (computed, or checked on the way in)."""
    if type(seq) is not int or not 0 < seq <= MAX_SAFE_INT:
        raise CanonicalEncodingError("seq is not a positive safe integer")
    return b"".join((b'{"node":', encode_basestring_ascii(node).encode("ascii"),
                     b',"prev_hash":"', prev_hash.encode("ascii"),
                     b'","revoked":', b"true" if revoked else b"false",
                     b',"seq":', str(seq).encode("ascii"), b"}"))


def record_hash(seq: int, prev_hash: str, node: str, revoked: bool, event_bytes: bytes) -> str:
    return hashlib.sha256(HASH_DOMAIN + _header(seq, prev_hash, node, revoked) + b"\n"
                          + event_bytes).hexdigest()


@dataclass(frozen=True)
class ChainHead:
    """The last record of a chain: its seq (0 for an empty chain) and hash."""

    seq: int
    hash: str


GENESIS_HEAD = ChainHead(0, GENESIS_HASH)


@dataclass(frozen=True)
class ChainedRecord:
    """One audit event with its place in the chain.

    `event_bytes` is the event's canonical encoding; `event` the event as a dict (decoded on
    first use; treat it as read-only). `node` is the id of the node that served the request;
    `revoked` is set when the commit-time re-check found the key's epoch had moved since the
    decision (DESIGN.md §5).
    """

    seq: int
    prev_hash: str
    hash: str
    node: str
    revoked: bool
    event_bytes: bytes

    @cached_property
    def event(self) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(self.event_bytes)
        return decoded

    def computed_hash(self) -> str:
        return record_hash(self.seq, self.prev_hash, self.node, self.revoked, self.event_bytes)

    def to_json_dict(self) -> dict[str, Any]:
        return {"event": self.event, "hash": self.hash, "node": self.node,
                "prev_hash": self.prev_hash, "revoked": self.revoked, "seq": self.seq}

    def to_line(self) -> bytes:
        """The record as one segment-file line: its canonical JSON and a newline.

        "event" sorts first, so the line is `{"event":` + event_bytes + the other members:
        spliced, not re-encoded.
        """
        seq, digest, prev, node, revoked = (self.seq, self.hash, self.prev_hash, self.node,
                                            self.revoked)
        # The writer thread formats every record the node applies, and the general encoder
        # costs several times more than this. encode_basestring_ascii is what the encoder
        # uses for a str, so for these exact types the bytes are the same; anything else
        # goes through canonical_bytes, so it is encoded -- or refused -- exactly as before.
        if (type(seq) is int and 0 < seq <= MAX_SAFE_INT and (revoked is False or revoked is True)
                and type(node) is str and type(digest) is str and type(prev) is str):
            rest = (f'"hash":{encode_basestring_ascii(digest)},'
                    f'"node":{encode_basestring_ascii(node)},'
                    f'"prev_hash":{encode_basestring_ascii(prev)},'
                    f'"revoked":{"true" if revoked else "false"},"seq":{seq}}}\n')
            return b"".join((b'{"event":', self.event_bytes, b",", rest.encode("ascii")))
        rest = canonical_bytes({"hash": digest, "node": node, "prev_hash": prev,
                                "revoked": revoked, "seq": seq})
        return b'{"event":' + self.event_bytes + b"," + rest[1:] + b"\n"

    @classmethod
    def from_json_dict(cls, data: Any) -> ChainedRecord:
        """A record from its JSON form; ValueError (never echoing values) if malformed."""
        if not isinstance(data, dict):
            raise ValueError("a record is not a JSON object")
        if data.keys() != _RECORD_KEYS:
            missing = sorted(_RECORD_KEYS - data.keys())
            extra = sorted(data.keys() - _RECORD_KEYS)
            raise ValueError(f"record members wrong (missing {missing}, unexpected {extra})")
        seq, node, revoked, event = data["seq"], data["node"], data["revoked"], data["event"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise ValueError("seq is not a positive integer")
        for name in ("prev_hash", "hash"):
            if not isinstance(data[name], str) or not _HEX64.fullmatch(data[name]):
                raise ValueError(f"{name} is not 64 lowercase hex digits")
        if not isinstance(node, str):
            raise ValueError("node is not a string")
        if not isinstance(revoked, bool):
            raise ValueError("revoked is not a boolean")
        if not isinstance(event, dict):
            raise ValueError("event is not an object")
        record = cls(seq, data["prev_hash"], data["hash"], node, revoked, canonical_bytes(event))
        record.__dict__["event"] = event  # prime the cached_property with what was parsed
        return record


@dataclass(frozen=True)
class AuditEntry:
    """What apply chains: an event's canonical bytes, the node that served the request, and
    the commit-time re-check's verdict. Build it with `AuditEntry.of` on the proposer side."""

    event_bytes: bytes
    node: str
    revoked: bool = False

    @classmethod
    def of(cls, event: Mapping[str, Any], node: str, revoked: bool = False) -> AuditEntry:
        """Encode an event (e.g. `AuditEvent.to_dict()`) canonically, once, for the log."""
        return cls(canonical_bytes(dict(event)), node, revoked)


def link(head: ChainHead, entries: Iterable[AuditEntry]) -> tuple[ChainHead, list[ChainedRecord]]:
    """Chain `entries` after `head`: the new head and the records, deterministically.

    Raises CanonicalEncodingError if an entry is unfit (its bytes fail `check_event_bytes`,
    its node is not a string); the caller's head is untouched then.
    """
    records: list[ChainedRecord] = []
    seq, prev = head.seq, head.hash
    for entry in entries:
        check_event_bytes(entry.event_bytes)
        if type(entry.revoked) is not bool or not isinstance(entry.node, str):
            raise CanonicalEncodingError("revoked is not a boolean or node not a string")
        seq += 1
        digest = record_hash(seq, prev, entry.node, entry.revoked, entry.event_bytes)
        records.append(ChainedRecord(seq, prev, digest, entry.node, entry.revoked,
                                     entry.event_bytes))
        prev = digest
    return ChainHead(seq, prev), records


class AuditChain:
    """The chain head held by the replicated state machine.

    `append` assigns sequence numbers and hashes; it reads no clock, draws no random number
    and does no I/O, and it is all-or-nothing: if one entry of a batch is unfit the head does
    not move (and it fails the same way on every replica).
    """

    def __init__(self, head: ChainHead = GENESIS_HEAD) -> None:
        self._head = head

    @property
    def head(self) -> ChainHead:
        return self._head

    def append(self, entries: Iterable[AuditEntry]) -> list[ChainedRecord]:
        new_head, records = link(self._head, entries)
        self._head = new_head
        return records

    def to_snapshot(self) -> dict[str, Any]:
        """The head as a plain map (msgpack-ready), for the state machine's snapshot."""
        return {"seq": self._head.seq, "hash": self._head.hash}

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> AuditChain:
        seq, digest = data["seq"], data["hash"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError("snapshot seq is not a non-negative integer")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError("snapshot hash is not 64 lowercase hex digits")
        return cls(ChainHead(seq, digest))


# -- verification --------------------------------------------------------------------------------

class Problem(StrEnum):
    HASH_MISMATCH = "hash_mismatch"            # content changed: the stored hash is not its hash
    PREV_HASH_MISMATCH = "prev_hash_mismatch"  # does not link to the record before it
    SEQ_GAP = "seq_gap"                        # a seq is missing (a record was removed)
    SEQ_OUT_OF_ORDER = "seq_out_of_order"      # records reordered or repeated
    MALFORMED = "malformed"                    # unreadable: not UTF-8, not JSON, not a record
    NON_CANONICAL = "non_canonical"            # readable, but not the bytes the writer wrote
    HEAD_MISMATCH = "head_mismatch"            # the chain does not end at the expected head


@dataclass(frozen=True)
class ChainError:
    """The first bad record found, and why.

    `position` is the 0-based index of the record among those verified (for HEAD_MISMATCH: the
    number of records, i.e. where the missing one should be); `seq` the seq the bad record
    carries (None if unreadable or missing); `expected_seq` the seq that belonged there.
    `file` and `line` (1-based) locate it in a segment directory.
    """

    problem: Problem
    position: int
    seq: int | None
    expected_seq: int
    message: str
    file: str | None = None
    line: int | None = None


@dataclass(frozen=True)
class TornTail:
    """An unterminated final line of the last segment: a write cut short by a crash."""

    file: str
    line: int
    length: int


@dataclass(frozen=True)
class VerifyResult:
    records: int  # records verified good, in order, before any error
    head: ChainHead  # the last good record (the start point if none)
    error: ChainError | None = None
    torn: TornTail | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ScannedRecord:
    """One position of a chain as a reader found it: a record, or a defect in its place."""

    record: ChainedRecord | None
    defect: Problem | None = None  # MALFORMED or NON_CANONICAL
    detail: str = ""
    seq_hint: int | None = None  # the seq an unreadable or non-canonical line carries, if any
    file: str | None = None
    line: int | None = None

    @property
    def seq(self) -> int | None:
        return self.record.seq if self.record is not None else self.seq_hint


def _where(item: ScannedRecord, position: int) -> str:
    if item.file is not None:
        return f"{item.file} line {item.line}"
    return f"position {position}"


def _check_item(item: ScannedRecord, position: int, expected_seq: int, prev_hash: str,
                rest: Iterator[ScannedRecord]) -> ChainError | None:
    def error(problem: Problem, message: str) -> ChainError:
        return ChainError(problem, position, item.seq, expected_seq,
                          f"{_where(item, position)}: {message}", item.file, item.line)

    if item.defect is not None or item.record is None:
        return error(item.defect or Problem.MALFORMED,
                     f"record expected to be seq {expected_seq} is {item.defect or 'missing'}"
                     + (f": {item.detail}" if item.detail else ""))
    record = item.record
    if record.seq < expected_seq:
        return error(Problem.SEQ_OUT_OF_ORDER,
                     f"seq {record.seq} where seq {expected_seq} belongs (reordered or repeated)")
    if record.seq > expected_seq:
        # A removed record and two swapped ones look alike here; tell them apart by whether
        # the missing seq turns up later.
        if any(later.seq == expected_seq for later in rest):
            return error(Problem.SEQ_OUT_OF_ORDER,
                         f"seq {record.seq} where seq {expected_seq} belongs; seq "
                         f"{expected_seq} comes later (records reordered)")
        return error(Problem.SEQ_GAP,
                     f"seq {record.seq} where seq {expected_seq} belongs; seq {expected_seq}"
                     + (" is missing" if record.seq == expected_seq + 1
                        else f"..{record.seq - 1} are missing") + " (records removed)")
    if record.prev_hash != prev_hash:
        return error(Problem.PREV_HASH_MISMATCH,
                     f"seq {record.seq} does not link to the record before it")
    try:
        computed = record.computed_hash()
    except CanonicalEncodingError as exc:
        return error(Problem.MALFORMED, f"seq {record.seq} cannot be encoded: {exc}")
    if computed != record.hash:
        return error(Problem.HASH_MISMATCH, f"seq {record.seq} content does not match its hash")
    return None


def verify_scanned(items: Iterable[ScannedRecord], *, start_prev_hash: str = GENESIS_HASH,
                   start_seq: int = 1, expected_head: ChainHead | None = None) -> VerifyResult:
    """Check a chain position by position; stop at the first bad record and name it.

    The chain alone cannot notice records removed from its end: pass `expected_head` (the head
    the replicated state holds) to require that the chain ends exactly there.
    """
    head = ChainHead(start_seq - 1, start_prev_hash)
    count = 0
    stream = iter(items)
    for position, item in enumerate(stream):
        found = _check_item(item, position, head.seq + 1, head.hash, stream)
        if found is not None:
            return VerifyResult(count, head, found)
        assert item.record is not None
        head = ChainHead(item.record.seq, item.record.hash)
        count += 1
    if expected_head is not None and head != expected_head:
        if head.seq < expected_head.seq:
            why = (f"the chain ends at seq {head.seq}, expected head is seq {expected_head.seq}: "
                   f"seq {head.seq + 1}..{expected_head.seq} are missing (records removed)")
        elif head.seq > expected_head.seq:
            why = (f"the chain runs to seq {head.seq}, past the expected head seq "
                   f"{expected_head.seq}")
        else:
            why = f"seq {head.seq} has hash {head.hash}, expected head hash {expected_head.hash}"
        return VerifyResult(count, head, ChainError(Problem.HEAD_MISMATCH, count, None,
                                                    head.seq + 1, why))
    return VerifyResult(count, head)


def verify_records(records: Iterable[ChainedRecord], start_prev_hash: str = GENESIS_HASH,
                   start_seq: int = 1, expected_head: ChainHead | None = None) -> VerifyResult:
    """Verify records in memory: seq order, links and hashes; see `verify_scanned`."""
    return verify_scanned((ScannedRecord(r) for r in records), start_prev_hash=start_prev_hash,
                          start_seq=start_seq, expected_head=expected_head)
