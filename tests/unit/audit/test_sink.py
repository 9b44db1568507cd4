"""The segment sink's writer thread: batches that queue up while an fsync runs are written
together, and nothing is joined across a gap."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kmsd.audit.chain import ChainedRecord
from kmsd.audit.segments import read_records
from kmsd.audit.sink import SegmentSink
from tests.unit.audit.support import chained


class _HeldWriter:
    """Wraps the sink's real SegmentWriter.append: the first call waits until released, so
    that what is put meanwhile queues up; every call's seqs are kept."""

    def __init__(self, sink: SegmentSink) -> None:
        self.calls: list[list[int]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self._append = sink._writer.append
        sink._writer.append = self._held_append  # type: ignore[method-assign]

    def _held_append(self, records: Sequence[ChainedRecord]) -> int:
        self.calls.append([r.seq for r in records])
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(10)
        return self._append(records)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SegmentSink]:
    opened = SegmentSink(str(tmp_path / "audit"))
    yield opened
    opened.close()


def _on_disk(sink: SegmentSink) -> list[int]:
    return [r.seq for r in read_records(sink.directory)]


def test_batches_queued_during_a_write_share_one_append(sink: SegmentSink) -> None:
    _, records = chained(12)
    held = _HeldWriter(sink)
    sink.put(records[0:2])
    assert held.entered.wait(10)
    for start in range(2, 12, 2):
        sink.put(records[start:start + 2])
    held.release.set()
    assert sink.wait_for(12)
    assert held.calls == [[1, 2], list(range(3, 13))]
    assert _on_disk(sink) == list(range(1, 13))


def test_batches_are_not_joined_across_a_gap(sink: SegmentSink) -> None:
    _, records = chained(9)
    held = _HeldWriter(sink)
    sink.put(records[0:2])
    assert held.entered.wait(10)
    sink.put(records[2:4])   # seq 3-4
    sink.put(records[6:8])   # seq 7-8: 5 and 6 never came
    sink.put(records[8:9])   # seq 9
    held.release.set()
    assert sink.wait_for(9)  # returns once the gap is known
    assert sink.gap == "audit records 5..6 are not on this node yet"
    assert held.calls == [[1, 2], [3, 4], [7, 8, 9]]
    assert _on_disk(sink) == [1, 2, 3, 4]

    sink.backfill(records[4:6])
    deadline = time.monotonic() + 10  # wait_for returns at once while the gap stands
    while sink.head is None or sink.head.seq < 9:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sink.gap is None
    assert _on_disk(sink) == list(range(1, 10))
