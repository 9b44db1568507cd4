"""The node's copy of the applied audit chain: append-only, size-rotated segment files.

Owns: the segment directory format, `SegmentWriter` (append, fsync, rotate, crash recovery),
`read_records`, `verify_directory` and `export_jsonl`.

Format: files `seg-<seq of the first record, zero-padded to 20 digits>.jsonl` in one directory,
read in seq order; each line is one `ChainedRecord` in canonical JSON followed by `\\n`
(`ChainedRecord.to_line`, see `chain`). Any other file in the directory is ignored.

Never does: store anything but the chained events -- which hold no plaintext, key material or
secret (`record`'s allow-lists) -- or rewrite a record once written. The one exception to
append-only is crash recovery, which cuts off a torn final line that no `append` call ever
returned for.

Everything here is blocking file I/O (an fsync can take milliseconds, much longer on a busy
disk): call it from an executor or a dedicated thread, never on the event loop.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from kmsd.audit.chain import (
    GENESIS_HASH,
    ChainedRecord,
    ChainHead,
    Problem,
    ScannedRecord,
    TornTail,
    VerifyResult,
    verify_scanned,
)
from kmsd.audit.record import EVENT_TIME_FORMAT

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_SEGMENT_NAME = re.compile(r"seg-(\d{20})\.jsonl")
_TAIL_BLOCK = 64 * 1024


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:020d}.jsonl"


def list_segments(directory: str | os.PathLike[str]) -> list[Path]:
    """The segment files of a directory in seq order (other files are ignored)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _SEGMENT_NAME.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChainContinuityError(ValueError):
    """Records handed to the writer do not continue the chain already on disk."""


class CorruptSegmentError(ValueError):
    """A segment line that is not a record the writer wrote (see `verify_directory`)."""

    def __init__(self, file: str, line: int, problem: Problem, detail: str) -> None:
        super().__init__(f"{file} line {line}: {problem}: {detail}")
        self.file, self.line, self.problem, self.detail = file, line, problem, detail


# -- reading -------------------------------------------------------------------------------------

def _parse_line(body: bytes, file: str, line: int) -> ScannedRecord:
    """A record from one line without its newline, or the defect that stands in its place."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        detail = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else f"not JSON ({exc})"
        return ScannedRecord(None, Problem.MALFORMED, detail, file=file, line=line)
    hint = data.get("seq") if isinstance(data, dict) else None
    hint = hint if isinstance(hint, int) and not isinstance(hint, bool) else None
    try:
        record = ChainedRecord.from_json_dict(data)
        canonical = record.to_line()
    except ValueError as exc:  # CanonicalEncodingError included: a float, say
        return ScannedRecord(None, Problem.MALFORMED, str(exc), hint, file, line)
    if canonical[:-1] != body:
        # Same content, different bytes (an escape's case, key order, ...): the writer never
        # produces this, so something rewrote the line.
        return ScannedRecord(None, Problem.NON_CANONICAL, "not in canonical form", record.seq,
                             file, line)
    return ScannedRecord(record, file=file, line=line)


def _unterminated(body: bytes, file: str, line: int) -> ScannedRecord | TornTail:
    """The final line of the last segment has no newline: torn write, or damage?

    A crash mid-append leaves a prefix of what was written: either an incomplete JSON value or
    a complete record without its newline. A complete value followed by more bytes is not a
    prefix of any line the writer writes (e.g. the newline itself was overwritten): damage.
    """
    try:
        text = body.decode("utf-8")  # a prefix of ASCII is ASCII: non-UTF-8 is damage
    except UnicodeDecodeError:
        return ScannedRecord(None, Problem.MALFORMED, "not UTF-8", file=file, line=line)
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return TornTail(file, line, len(body))
    if end == len(text):
        return TornTail(file, line, len(body))
    return ScannedRecord(None, Problem.MALFORMED, "unterminated line with trailing bytes",
                         file=file, line=line)


def _line_seq(line: bytes) -> int | None:
    """The seq a canonical line ends with (`,"seq":N}`), read without parsing the rest; None
    if the line does not end like one."""
    _, found, tail = line.rstrip(b"\n").rpartition(b',"seq":')
    digits = tail[:-1]
    if not found or not tail.endswith(b"}") or not digits.isdigit() or len(digits) > 16:
        return None
    return int(digits)


def _line_start(f: IO[bytes], position: int) -> int:
    """Where the first line that starts at or after `position` starts."""
    if position == 0:
        return 0
    f.seek(position - 1)
    f.readline()
    return f.tell()


def _first_offset_after(f: IO[bytes], after: int) -> int:
    """Byte offset of the first line of a segment whose seq is above `after`.

    Lines are in seq order and each ends with its seq, so this bisects over byte positions and
    reads one line per probe: a page of `read_records(after=...)` parses none of the records
    before it (only their newlines are counted, for the line numbers of any damage after). A
    probed line that does not end with a seq (damage) gives 0: the file is then read from its
    start and the damage reported where it is.
    """
    size = f.seek(0, os.SEEK_END)
    low, high = 0, size  # the smallest position whose line is above `after`, or the end
    while low < high:
        middle = (low + high) // 2
        f.seek(_line_start(f, middle))
        line = f.readline()
        if not line.endswith(b"\n"):  # the end, or a torn final line: nothing after it
            high = middle
            continue
        seq = _line_seq(line)
        if seq is None:
            return 0
        if seq > after:
            high = middle
        else:
            low = middle + 1
    return _line_start(f, low)


def _lines_before(f: IO[bytes], offset: int) -> int:
    f.seek(0)
    count = 0
    while offset > 0:
        chunk = f.read(min(offset, 1 << 20))
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset -= len(chunk)
    return count


def _first_segment_after(segments: list[Path], after: int) -> int:
    """Index of the segment holding the record after `after`: the last whose first seq is at
    most `after + 1` (segment names carry their first seq)."""
    index = 0
    for i, path in enumerate(segments):
        match = _SEGMENT_NAME.fullmatch(path.name)
        if match is None or int(match.group(1)) > after + 1:
            break
        index = i
    return index


def scan_directory(directory: str | os.PathLike[str], after: int = 0
                   ) -> Iterator[ScannedRecord | TornTail]:
    """Every line of every segment in order, as a record or a defect; a torn final line of the
    last segment ends the scan as a `TornTail`.

    With `after`, the scan starts at the line of the first record above that seq (found from
    the segment names and by bisection, see `_first_offset_after`), not at the first record.
    """
    segments = list_segments(directory)
    first = _first_segment_after(segments, after) if after > 0 else 0
    for index in range(first, len(segments)):
        path = segments[index]
        last_segment = index == len(segments) - 1
        with path.open("rb") as f:
            start_line = 1
            if index == first and after > 0:
                offset = _first_offset_after(f, after)
                start_line += _lines_before(f, offset)
                f.seek(offset)
            for number, raw in enumerate(f, start=start_line):
                if raw.endswith(b"\n"):
                    yield _parse_line(raw[:-1], path.name, number)
                elif last_segment:
                    yield _unterminated(raw, path.name, number)
                    return
                else:  # only the last segment can hold a write in progress
                    yield ScannedRecord(None, Problem.MALFORMED,
                                        "unterminated line in a segment that is not the last",
                                        file=path.name, line=number)


class RecordReader(Iterator[ChainedRecord]):
    """Iterates the records of a segment directory in order.

    A torn final line (a crash mid-write) ends the iteration quietly and is reported in
    `torn`; any other unreadable or rewritten line raises CorruptSegmentError. The reader does
    not check the chain: that is `verify_directory`.
    """

    def __init__(self, directory: str | os.PathLike[str], after: int = 0) -> None:
        self.torn: TornTail | None = None
        self._after = after
        self._items = scan_directory(directory, after)

    def __iter__(self) -> RecordReader:
        return self

    def __next__(self) -> ChainedRecord:
        while True:
            item = next(self._items)
            if isinstance(item, TornTail):
                self.torn = item
                raise StopIteration
            if item.record is None:
                raise CorruptSegmentError(item.file or "", item.line or 0,
                                          item.defect or Problem.MALFORMED, item.detail)
            # The scan may start earlier than asked (a damaged line stops the bisection).
            if item.record.seq > self._after:
                return item.record


def read_records(directory: str | os.PathLike[str], after: int = 0) -> RecordReader:
    """The records in order; with `after`, from the first above that seq (a page of a tail)."""
    return RecordReader(directory, after)


def verify_directory(directory: str | os.PathLike[str], *,
                     expected_head: ChainHead | None = None,
                     start_prev_hash: str = GENESIS_HASH, start_seq: int = 1) -> VerifyResult:
    """Check the chain across all segments; name the first bad record by seq, position, file
    and line.

    A torn final line is reported in `torn` and is not an error: it is a write no `append`
    returned for. Records removed from the end are only detectable against `expected_head`
    (the head in the replicated state). A node that joined from a snapshot starts its files
    mid-chain: pass that start as `start_seq`/`start_prev_hash`.
    """
    torn: list[TornTail] = []

    def records() -> Iterator[ScannedRecord]:
        for item in scan_directory(directory):
            if isinstance(item, TornTail):
                torn.append(item)
                return
            yield item

    result = verify_scanned(records(), start_prev_hash=start_prev_hash, start_seq=start_seq,
                            expected_head=expected_head)
    return replace(result, torn=torn[0] if torn else None)


# -- export --------------------------------------------------------------------------------------

def _epoch(value: float | datetime) -> float:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.timestamp()
    return float(value)


def export_jsonl(directory: str | os.PathLike[str], out: IO[str], *,
                 since: float | datetime | None = None, until: float | datetime | None = None,
                 event_name: str | None = None, chain_fields: bool = True) -> int:
    """Write the CloudTrail-shaped events, one JSON object per line; return how many.

    `since` (inclusive) and `until` (exclusive) filter on eventTime (epoch seconds or datetime),
    `event_name` on eventName. With `chain_fields`, each event's `additionalEventData.kmsdAudit`
    carries seq, hash, node and revoked -- revoked matters: such a call was answered with an
    error although the event records the decision. Does not verify the chain (run
    `verify_directory` for that); raises CorruptSegmentError on an unreadable line.
    """
    low = None if since is None else _epoch(since)
    high = None if until is None else _epoch(until)
    written = 0
    for record in read_records(directory):
        event = record.event
        if event_name is not None and event.get("eventName") != event_name:
            continue
        if low is not None or high is not None:
            try:
                when = datetime.strptime(str(event.get("eventTime")), EVENT_TIME_FORMAT)
            except ValueError:
                continue
            at = when.replace(tzinfo=UTC).timestamp()
            if (low is not None and at < low) or (high is not None and at >= high):
                continue
        line: dict[str, Any] = dict(event)
        if chain_fields:
            extra = line.get("additionalEventData")
            extra = dict(extra) if isinstance(extra, dict) else {}
            extra["kmsdAudit"] = {"seq": record.seq, "hash": record.hash, "node": record.node,
                                  "revoked": record.revoked}
            line["additionalEventData"] = extra
        out.write(json.dumps(line, separators=(",", ":"), ensure_ascii=True) + "\n")
        written += 1
    return written


# -- writing -------------------------------------------------------------------------------------

class SegmentWriter:
    """Appends chained records to the segment directory.

    Durability: every `append` call ends with flush + fsync of each file it wrote (and an fsync
    of the directory whenever a segment file is created), so once `append` returns the records
    survive a power loss, not only a process crash. pysyncobj never fsyncs its journal
    (FACTS.md §0.8), so these files are the node's only fsynced copy of the audit trail. One
    fsync per call is the price, so the caller batches: hand over a whole committed Raft entry
    (a group-committed batch of records), never one record at a time.

    Rotation: a record goes to a new segment when adding it would take the current one past
    `max_bytes` (a segment is never larger than max_bytes unless it holds a single record that
    is).

    Continuity: records must continue the chain on disk (seq + 1, prev_hash = last hash).
    Records at or below the last seq on disk are skipped -- a Raft replay after a restart hands
    over records again -- except that the last one must match its hash. A directory with no
    records accepts any first record (a node restored from a snapshot starts mid-chain).

    Recovery on open: a torn final line (a crash mid-append) is cut off and reported in
    `recovered_torn`; empty trailing segment files are removed.

    All of this is blocking I/O: run it off the event loop. Not thread-safe: one writer per
    directory, used from one thread at a time.
    """

    def __init__(self, directory: str | os.PathLike[str],
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.recovered_torn: TornTail | None = None
        self._head: ChainHead | None = None
        self._file: IO[bytes] | None = None
        self._size = 0
        self._broken = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()

    @property
    def head(self) -> ChainHead | None:
        """The last record on disk, or None if there is none."""
        return self._head

    # -- recovery --

    def _recover(self) -> None:
        segments = list_segments(self.directory)
        newest = True
        while segments:
            path = segments[-1]
            # Only the newest segment can hold a write in progress; an earlier one that does
            # not end in a newline is damaged.
            last_line = self._repair_tail(path, repair=newest)
            newest = False
            if last_line is None:  # nothing left in this segment
                path.unlink()
                _fsync_dir(self.directory)
                segments.pop()
                continue
            item = _parse_line(last_line, path.name, 0)
            if item.record is None:
                raise CorruptSegmentError(path.name, 0, item.defect or Problem.MALFORMED,
                                          f"last record unreadable: {item.detail}")
            self._head = ChainHead(item.record.seq, item.record.hash)
            self._file = path.open("ab")
            self._size = path.stat().st_size
            return

    def _repair_tail(self, path: Path, repair: bool) -> bytes | None:
        """Cut a torn final line off `path` (if `repair`); return its last complete line
        without the newline, or None if it has none."""
        size = path.stat().st_size
        with path.open("r+b") as f:
            tail, start = b"", size
            # Read backwards until the block holds the last complete line whole.
            while start > 0:
                start = max(0, start - _TAIL_BLOCK)
                f.seek(start)
                tail = f.read(size - start)
                end = tail.rfind(b"\n")
                if end != -1 and (tail.rfind(b"\n", 0, end) != -1 or start == 0):
                    break
            end = tail.rfind(b"\n")
            complete = start + end + 1  # bytes up to and including the last newline
            if complete < size:
                if not repair:
                    raise CorruptSegmentError(path.name, 0, Problem.MALFORMED,
                                              "unterminated line in a segment that is not the last")
                with path.open("rb") as count:
                    line = count.read(complete).count(b"\n") + 1
                self.recovered_torn = TornTail(path.name, line, size - complete)
                f.truncate(complete)
                f.flush()
                os.fsync(f.fileno())
            if end == -1:
                return None
            begin = tail.rfind(b"\n", 0, end) + 1
            return tail[begin:end]

    # -- appending --

    def _new_records(self, records: Sequence[ChainedRecord]) -> list[ChainedRecord]:
        # Runs for every record the node applies: the head checked against is kept in locals
        # rather than in a ChainHead made per record.
        head = self._head
        known = head is not None  # an empty directory accepts any first record
        seq, digest = (head.seq, head.hash) if head is not None else (0, "")
        fresh: list[ChainedRecord] = []
        for record in records:
            if known:
                if record.seq <= seq:
                    if record.seq == seq and record.hash != digest:
                        raise ChainContinuityError(
                            f"seq {record.seq} is already on disk with a different hash")
                    continue  # already written: a replay
                if record.seq != seq + 1 or record.prev_hash != digest:
                    raise ChainContinuityError(
                        f"seq {record.seq} does not continue the chain at seq {seq}")
            fresh.append(record)
            seq, digest, known = record.seq, record.hash, True
        return fresh

    def _start_segment(self, first_seq: int) -> None:
        self._close_file()
        self._file = (self.directory / segment_name(first_seq)).open("xb")
        self._size = 0
        _fsync_dir(self.directory)  # the new file's directory entry must survive too

    def _sync(self, pending: list[bytes]) -> None:
        assert self._file is not None
        self._file.write(b"".join(pending))
        self._file.flush()
        os.fsync(self._file.fileno())
        pending.clear()

    def append(self, records: Sequence[ChainedRecord]) -> int:
        """Write `records` (one committed batch), fsync, and return how many were new."""
        if self._broken:
            raise RuntimeError("a previous append failed; reopen the writer to recover")
        fresh = self._new_records(records)
        if not fresh:
            return 0
        lines = [r.to_line() for r in fresh]  # encode everything before touching the disk
        try:
            pending: list[bytes] = []
            for record, line in zip(fresh, lines, strict=True):
                if self._file is None or (self._size > 0
                                          and self._size + len(line) > self.max_bytes):
                    if pending:
                        self._sync(pending)
                    self._start_segment(record.seq)
                pending.append(line)
                self._size += len(line)
            self._sync(pending)
        except BaseException:
            # Part of the batch may be on disk; only reopening (recovery) knows what.
            self._broken = True
            raise
        self._head = ChainHead(fresh[-1].seq, fresh[-1].hash)
        return len(fresh)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
