"""pysyncobj's file journal, changed so that dropped entries do not linger on disk.

pysyncobj 0.3.17's FileJournal rewrites its records from the start of the file
after a log compaction (and moves its end marker back after a conflict
truncation) but leaves the old bytes beyond the new end in place. Those bytes
hold commands with wrapped key material of keys that may since have been
deleted; a deleted key's material must be gone from the journal once the log
is compacted. This subclass overwrites the dropped range with zeros, on
pysyncobj's own thread, inside the same calls.

It also closes a Raft safety hole of pysyncobj 0.3.17: a follower handling
append_entries deletes every entry after `prevLogIdx` before appending the
leader's batch, even entries that match the leader's log (Raft deletes only
from the first conflict). A retransmitted, shorter batch then drops entries
the follower had acknowledged (and applied); under faults such a follower can
win an election and committed entries are lost (found by the chaos runs).
Here a follower keeps the entries it knows to be committed (Raft's leader
completeness: every later leader holds them) and the suffix entries of the
current term (by log matching they came from the current leader and match its
log), and truncates only from the first other entry; re-sent entries already
present are skipped rather than appended twice. (The follower's commit index
only ever covers entries verified against a leader's log: see
cluster/syncobj_guard.py.)

It relies on FileJournal internals of the pinned pysyncobj version (checked by
tests/unit/cluster/test_journal.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pysyncobj.syncobj
from pysyncobj.journal import FIRST_RECORD_OFFSET, FileJournal, MemoryJournal

_ZEROS = memoryview(bytes(1 << 20))


class ScrubbingFileJournal(FileJournal):
    # Set by RaftNode once the SyncObj exists: the node's current Raft term.
    current_term: Callable[[], int] | None = None

    def _end(self) -> int:
        return self._FileJournal__currentOffset  # type: ignore[attr-defined]

    def _zero(self, start: int, end: int) -> None:
        # Through the file descriptor rather than the mmap: pwrite releases the GIL, so
        # zeroing the megabytes a compaction drops does not stall the node's event loop
        # (a slice write into the mmap held it 5-8 ms for 2,000 entries of 3-12 KB:
        # bench/journal_compaction.py). The mapping is shared, so it sees the zeros
        # through the same page cache.
        fd = self._FileJournal__journalFile._ResizableFile__f.fileno()  # type: ignore[attr-defined]
        while start < end:
            start += os.pwrite(fd, _ZEROS[:end - start], start)

    def clear(self) -> None:
        end = self._end()
        super().clear()
        self._zero(FIRST_RECORD_OFFSET, end)

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N803 - pysyncobj's name
        # As FileJournal does it (rewrite the kept entries from the start), but zeroing
        # only the bytes beyond them: the rest is overwritten by the kept entries.
        end = self._end()
        kept = [self[i] for i in range(entryTo, len(self))]
        FileJournal.clear(self)
        for entry in kept:
            FileJournal.add(self, *entry)
        self._zero(self._end(), end)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N803 - pysyncobj's name
        if self.current_term is not None:
            term = self.current_term()
            committed = self.getRaftCommitIndex()
            # Committed entries are in every later leader's log, and the current term's
            # entries came from the current leader: both match it, so both are kept.
            while entryFrom < len(self) and (self[entryFrom][1] <= committed
                                             or self[entryFrom][2] == term):
                entryFrom += 1
        self._truncate(entryFrom)

    def _truncate(self, entryFrom: int) -> None:  # noqa: N803
        if entryFrom >= len(self):
            return
        end = self._end()
        super().deleteEntriesFrom(entryFrom)
        self._zero(self._end(), end)

    def add(self, command: bytes, idx: int, term: int) -> None:
        if len(self) and idx <= self[-1][1]:
            position = idx - self[0][1]
            if position >= 0 and self[position][2] == term:
                return  # already here, kept by deleteEntriesFrom: the same entry
            self._truncate(max(position, 0))  # a conflict: Raft deletes from here
        super().add(command, idx, term)


def _create_journal(journal_file: str | None = None) -> Any:
    if journal_file is None:
        return MemoryJournal()
    return ScrubbingFileJournal(journal_file)


def install() -> None:
    """Make every SyncObj created afterwards in this process use the scrubbing journal."""
    pysyncobj.syncobj.createJournal = _create_journal
