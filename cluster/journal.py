"""pysyncobj's file journal, changed so that dropped entries do not linger on disk.

pysyncobj 0.3.17's FileJournal rewrites its records from the start of the file
after a log compaction (and moves its end marker back after a conflict
truncation) but leaves the old bytes beyond the new end in place. Those bytes
hold commands with wrapped key material of keys that may since have been
deleted; a deleted key's material must be gone from the journal once the log
is compacted. This subclass overwrites the dropped range with zeros, on
pysyncobj's own thread, inside the same calls.

It relies on FileJournal internals of the pinned pysyncobj version (checked by
tests/unit/cluster/test_journal.py).
"""

from __future__ import annotations

from typing import Any

import pysyncobj.syncobj
from pysyncobj.journal import FIRST_RECORD_OFFSET, FileJournal, MemoryJournal


class ScrubbingFileJournal(FileJournal):
    def _end(self) -> int:
        return self._FileJournal__currentOffset  # type: ignore[attr-defined]

    def _zero(self, start: int, end: int) -> None:
        if end > start:
            self._FileJournal__journalFile.write(start, b"\0" * (end - start))  # type: ignore[attr-defined]

    def clear(self) -> None:
        end = self._end()
        super().clear()
        self._zero(FIRST_RECORD_OFFSET, end)

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N803 - pysyncobj's name
        end = self._end()
        super().deleteEntriesFrom(entryFrom)
        self._zero(self._end(), end)


def _create_journal(journal_file: str | None = None) -> Any:
    if journal_file is None:
        return MemoryJournal()
    return ScrubbingFileJournal(journal_file)


def install() -> None:
    """Make every SyncObj created afterwards in this process use the scrubbing journal."""
    pysyncobj.syncobj.createJournal = _create_journal
