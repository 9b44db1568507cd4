"""Time as the proposer side sees it. The state machine never reads a clock."""

from __future__ import annotations

import os
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class OffsetClock:
    """Real time plus an offset in seconds read from a file: a test-only knob.

    Tests write the file to move a node's proposer clock forward (deletion
    windows, rotation periods) without waiting days. SigV4 never uses it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._offset = 0.0

    def now(self) -> float:
        try:
            info = os.stat(self.path)
            stamp = (info.st_mtime_ns, info.st_size)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as handle:
                    self._offset = float(handle.read().strip() or 0)
                self._stamp = stamp
        except (OSError, ValueError):
            self._offset = 0.0
        return time.time() + self._offset
