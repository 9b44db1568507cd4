"""The scrubbing journal: entries pysyncobj drops are zeroed on disk, the rest survive."""

from __future__ import annotations

import os

import pysyncobj.syncobj
from pysyncobj import SyncObj, SyncObjConf

from cluster import journal
from cluster.journal import ScrubbingFileJournal


def _entries(count: int) -> list[tuple[bytes, int, int]]:
    return [(b"SECRET-%04d" % i + b"x" * 50, i + 1, 1) for i in range(count)]


def _file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def test_compaction_zeroes_dropped_entries(tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    log = ScrubbingFileJournal(path)
    for entry in _entries(20):
        log.add(*entry)
    log.flush()
    assert b"SECRET-0003" in _file(path)
    log.deleteEntriesTo(15)  # what pysyncobj does after a snapshot
    log.flush()
    content = _file(path)
    for i in range(15):
        assert b"SECRET-%04d" % i not in content
    for i in range(15, 20):
        assert b"SECRET-%04d" % i in content
    log._destroy()
    reopened = ScrubbingFileJournal(path)
    assert [reopened[i][1] for i in range(len(reopened))] == list(range(16, 21))
    reopened._destroy()


def test_conflict_truncation_zeroes_the_tail(tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    log = ScrubbingFileJournal(path)
    for entry in _entries(10):
        log.add(*entry)
    log.deleteEntriesFrom(6)
    log.flush()
    content = _file(path)
    assert all(b"SECRET-%04d" % i in content for i in range(6))
    assert not any(b"SECRET-%04d" % i in content for i in range(6, 10))
    log._destroy()


def test_install_makes_syncobj_use_the_scrubbing_journal(tmp_path) -> None:
    journal.install()
    assert pysyncobj.syncobj.createJournal is journal._create_journal
    node = SyncObj("127.0.0.1:0", [], conf=SyncObjConf(
        journalFile=os.path.join(tmp_path, "j"), autoTick=False, password="p"))
    try:
        assert isinstance(node._SyncObj__raftLog, ScrubbingFileJournal)
    finally:
        node.destroy()
