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


def test_compaction_zeroes_every_dropped_byte_of_a_journal_larger_than_a_chunk(tmp_path) -> None:
    path = str(tmp_path / "raft.journal")
    log = ScrubbingFileJournal(path)
    body = b"\xa5" * 300_000  # 12 entries: 3.6 MB dropped, several zeroing chunks
    for i in range(14):
        log.add(b"SECRET-%04d" % i + body, i + 1, 1)
    old_end = log._end()
    log.deleteEntriesTo(12)
    new_end = log._end()
    log.flush()
    content = _file(path)
    assert old_end - new_end > 3 * len(journal._ZEROS)
    assert content[new_end:old_end] == bytes(old_end - new_end)
    assert content.count(body) == 2
    log._destroy()
    reopened = ScrubbingFileJournal(path)
    assert [reopened[i][0][:11] for i in range(len(reopened))] == [b"SECRET-0012", b"SECRET-0013"]
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


def _log_with(tmp_path, terms: list[int], current_term: int) -> ScrubbingFileJournal:
    log = ScrubbingFileJournal(str(tmp_path / "raft.journal"))
    for i, term in enumerate(terms):
        log.add(b"cmd-%d" % (i + 1), i + 1, term)
    log.current_term = lambda: current_term
    return log


def test_a_resent_shorter_batch_keeps_entries_of_the_current_term(tmp_path) -> None:
    # Follower holds 1..10 of term 2 (acknowledged to the leader of term 2). The leader
    # re-sends prevLogIdx=5 with entries 6..7: pysyncobj deletes from 6, then appends.
    log = _log_with(tmp_path, [2] * 10, current_term=2)
    log.deleteEntriesFrom(5)
    log.add(b"cmd-6", 6, 2)
    log.add(b"cmd-7", 7, 2)
    assert [(log[i][1], log[i][2]) for i in range(len(log))] == [(i, 2) for i in range(1, 11)]
    log._destroy()


def test_entries_of_an_older_term_are_truncated_from_the_first_conflict(tmp_path) -> None:
    # Entries 6..10 came from an old leader (term 1); the leader of term 3 sends 6..7.
    log = _log_with(tmp_path, [1] * 10, current_term=3)
    log.deleteEntriesFrom(5)
    log.add(b"new-6", 6, 3)
    log.add(b"new-7", 7, 3)
    assert [(log[i][1], log[i][2]) for i in range(len(log))] == [
        (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 3), (7, 3)]
    log._destroy()
    reopened = ScrubbingFileJournal(str(tmp_path / "raft.journal"))
    assert [reopened[i][0] for i in range(len(reopened))][-2:] == [b"new-6", b"new-7"]
    reopened._destroy()


def test_a_conflicting_entry_at_an_existing_index_replaces_the_rest(tmp_path) -> None:
    log = _log_with(tmp_path, [2, 2, 2, 2], current_term=2)
    log.add(b"other-3", 3, 4)  # same index, another term: Raft deletes 3.. and appends
    assert [(log[i][1], log[i][2]) for i in range(len(log))] == [(1, 2), (2, 2), (3, 4)]
    log._destroy()


def test_a_resent_shorter_batch_keeps_committed_entries_of_older_terms(tmp_path) -> None:
    # Follower holds 1..10 (6..10 of term 1, committed through 9) and the leader of term 2
    # re-sends prevLogIdx=5 with entry 6 only: 6..9 are committed and stay; 10 may conflict.
    log = _log_with(tmp_path, [1] * 10, current_term=2)
    log.setRaftCommitIndex(9)
    log.deleteEntriesFrom(5)
    log.add(b"cmd-6", 6, 1)
    assert [(log[i][1], log[i][2]) for i in range(len(log))] == [(i, 1) for i in range(1, 10)]
    log._destroy()
