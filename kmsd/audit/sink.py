"""Writing the applied chain to this node's segment files, off every hot thread.

The Raft thread hands over each applied batch (a non-blocking queue put); one
writer thread appends and fsyncs it with SegmentWriter. A replay after a
restart re-applies records already on disk; SegmentWriter skips those. A gap
(records before this node's snapshot that it never wrote) is recorded in
`gap` and reported by status and verify, not papered over.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

import structlog

from kmsd.audit.chain import ChainedRecord, ChainHead
from kmsd.audit.segments import ChainContinuityError, SegmentWriter

log = structlog.get_logger("kmsd.audit")

_STOP = object()


class SegmentSink:
    def __init__(self, directory: str, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.directory = directory
        self._writer = SegmentWriter(directory, max_bytes)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._written = threading.Condition()
        self.gap: str | None = None
        self._thread = threading.Thread(target=self._run, name="audit-segments", daemon=True)
        self._thread.start()

    @property
    def head(self) -> ChainHead | None:
        """The last record written (None before the first)."""
        return self._writer.head

    def put(self, records: Sequence[ChainedRecord]) -> None:
        """Called on the Raft thread for every applied batch: never blocks."""
        self._queue.put(list(records))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            records: list[ChainedRecord] = item  # type: ignore[assignment]
            try:
                self._writer.append(records)
            except ChainContinuityError as exc:
                if self.gap is None:
                    self.gap = str(exc)
                    log.error("audit_segment_gap", detail=str(exc))
            except OSError as exc:
                log.error("audit_segment_write_failed", error=exc.strerror)
            with self._written:
                self._written.notify_all()

    def wait_for(self, seq: int, timeout: float = 5.0) -> bool:
        """Block (in a worker thread, never the loop) until records up to `seq` are written."""
        with self._written:
            return self._written.wait_for(
                lambda: (self._writer.head is not None and self._writer.head.seq >= seq)
                or self.gap is not None, timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=10)
        self._writer.close()
