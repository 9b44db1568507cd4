"""Writing the applied chain to this node's segment files, off every hot thread.

The Raft tick hands over each applied batch (a non-blocking queue put); one
writer thread appends and fsyncs it with SegmentWriter. A replay after a
restart re-applies records already on disk; SegmentWriter skips those.

A node that joined late, or whose data dir was wiped, receives the state as a
Raft snapshot and applies only the records after it: the earlier ones are a
gap. The sink then holds the batches that do not continue its files, and
`kmsd.audit.backfill` fetches the missing records from a peer, verifies that
they link the files to the held batches, and hands them back here to write
first. Nothing is written out of order and nothing is skipped.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from kmsd.audit.chain import ChainedRecord, ChainHead
from kmsd.audit.segments import ChainContinuityError, SegmentWriter

log = structlog.get_logger("kmsd.audit")

_STOP = object()


@dataclass(frozen=True)
class Gap:
    """Records after `after` (the files' head, 0 if empty) and before `before` are missing."""

    after: ChainHead | None
    before: ChainedRecord

    def describe(self) -> str:
        first = self.after.seq + 1 if self.after else 1
        return f"audit records {first}..{self.before.seq - 1} are not on this node yet"


class _Backfill:
    def __init__(self, records: list[ChainedRecord]) -> None:
        self.records = records


class SegmentSink:
    def __init__(self, directory: str, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        self._writer = SegmentWriter(directory, max_bytes)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._written = threading.Condition()
        self._held: list[list[ChainedRecord]] = []
        self.pending_gap: Gap | None = None
        self._thread = threading.Thread(target=self._run, name="audit-segments", daemon=True)
        self._thread.start()

    @property
    def gap(self) -> str | None:
        gap = self.pending_gap
        return gap.describe() if gap else None

    @property
    def head(self) -> ChainHead | None:
        """The last record written (None before the first)."""
        return self._writer.head

    def put(self, records: Sequence[ChainedRecord]) -> None:
        """Called in the Raft tick (on the event loop) for every applied batch: never blocks."""
        self._queue.put(list(records))

    def backfill(self, records: list[ChainedRecord]) -> None:
        """Missing records fetched from a peer; written before the held batches."""
        self._queue.put(_Backfill(records))

    def _write(self, records: list[ChainedRecord]) -> bool:
        try:
            self._writer.append(records)
        except ChainContinuityError:
            return False
        except OSError as exc:
            log.error("audit_segment_write_failed", error=exc.strerror)
        return True

    def _run(self) -> None:
        while True:
            for item in self._next_items():
                if item is _STOP:
                    return
                if isinstance(item, _Backfill):
                    if self._write(item.records):
                        held, self._held = self._held, []
                        self.pending_gap = None
                        for batch in held:
                            self._accept(batch)
                else:
                    self._accept(item)  # type: ignore[arg-type]
            with self._written:
                self._written.notify_all()

    def _next_items(self) -> list[object]:
        """What was handed over since the last write, with runs of batches that continue each
        other joined: every batch applied while an fsync ran is written with one more fsync,
        not one each (an fsync costs the writer more CPU than formatting a batch does)."""
        items: list[object] = [self._queue.get()]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items
            last = items[-1]
            if (type(item) is list and type(last) is list and item and last
                    and item[0].seq == last[-1].seq + 1 and item[0].prev_hash == last[-1].hash):
                last.extend(item)  # both are the sink's own copies (see put)
            else:
                items.append(item)

    def _accept(self, batch: list[ChainedRecord]) -> None:
        starts_mid_chain = self._writer.head is None and batch[0].seq != 1
        if self.pending_gap is not None:
            self._held.append(batch)
        elif starts_mid_chain or not self._write(batch):
            self.pending_gap = Gap(self._writer.head, batch[0])
            self._held.append(batch)
            log.warning("audit_segment_gap", detail=self.pending_gap.describe())

    def wait_for(self, seq: int, timeout: float = 5.0) -> bool:
        """Block (in a worker thread, never the loop) until records up to `seq` are written."""
        with self._written:
            return self._written.wait_for(
                lambda: (self._writer.head is not None and self._writer.head.seq >= seq)
                or self.pending_gap is not None, timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)
        self._writer.close()
