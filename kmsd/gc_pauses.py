"""The garbage collector in a serving process: the lasting heap frozen, every pause measured.

Owns: `freeze_heap`, called where what the process holds is its lasting structure (a node
once started and again once ready, an API worker once it serves), and `GcPauses`, which
times each collection for the node's metrics.

Why: CPython's full collection (generation 2) walks every container object the process
holds, and a node holds mostly what it built at start: its modules, botocore's service
model, the request validators. A full collection comes when enough objects have outlived
two young collections: rarely under a steady load, at once when many connections close
(64 at the end of a benchmark load: 48-96 ms, on all three nodes of a cluster at the same
moment, as they apply the same entries), and every ~2 s with asyncio's debug mode on. The
GIL is held throughout: the event loop stands still, and the leader's pause holds back
every node's audit commits. `gc.freeze` moves the objects that exist to the permanent
generation, which collections skip: the same full collections then take ~1 ms. Objects
made later are collected as before.

Never does: freeze once the process serves. A frozen object is never freed as part of an
unreachable reference cycle, so freezing happens only at those start-up points, after a
full collection: what could be lost is a cycle still alive then and dropped later, once.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from kmsd.metric_tally import Row, add_to_row, empty_row


def freeze_heap() -> int:
    """Move every object the collector tracks to the permanent generation; returns how many
    objects are frozen now."""
    gc.collect()  # what is garbage already must not be frozen with the rest
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """How long each of this process's collections took, by generation, as histogram rows
    of kmsd.metric_tally's shape.

    The callback runs inside the collection, on whichever thread's allocation set it off,
    and takes no lock: the collector runs one collection at a time, callbacks included, and a
    lock taken there could be held, copied, by a child pysyncobj forks for a snapshot."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # Every generation's row made here: the callback only adds to them, so a scrape's
        # copy never sees the dict change size under it.
        self.rows: dict[str, Row] = {str(generation): empty_row(bounds)
                                     for generation in range(3)}
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def copy(self) -> dict[str, Row]:
        return {generation: list(row) for generation, row in self.rows.items()}

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        add_to_row(self.rows[str(info["generation"])], self.bounds,
                   time.perf_counter() - self._started)
