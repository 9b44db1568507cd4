"""pysyncobj driven by the node's event loop instead of a tick thread of its own.

With `autoTick=True` pysyncobj runs every tick (socket reads and writes, elections,
appending and applying entries, compaction, callbacks) on a thread of its own. Under
load that thread and the event loop hand the GIL back and forth several times per
request, and every hand-off is a futex wake and a task switch on a machine whose
cores the node shares with its peers.

Here the transport's sockets are watched by the event loop itself (`LoopPoller`,
pysyncobj's poller interface on `add_reader`/`add_writer`), and `LoopTicker` runs a
tick at the loop's next turn after a socket event (one tick, however many events
came in a turn) and at least every `period` seconds, which is what the tick
thread's `poll(autoTickPeriod)` gave. Replicated methods, their callbacks and
pysyncobj's tick callbacks then all run on the event loop thread. Another thread
wakes a tick through pysyncobj's own notification pipe, one of the loop's readers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pysyncobj import poller as pysyncobj_poller
from pysyncobj import syncobj as pysyncobj_syncobj
from pysyncobj.poller import POLL_EVENT_TYPE, Poller

_READ = POLL_EVENT_TYPE.READ
_WRITE = POLL_EVENT_TYPE.WRITE

log = logging.getLogger(__name__)


class LoopPoller(Poller):
    """pysyncobj's poller on an asyncio loop: `poll` has nothing left to do, the loop
    calls each descriptor's callback when it is ready, then `on_event`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[], None]) -> None:
        self._loop = loop
        self._on_event = on_event
        # descriptor -> (its callback, the events it is watched for)
        self._watched: dict[int, tuple[Callable[[int, int], None], int]] = {}

    def subscribe(self, descr: int, callback: Callable[[int, int], None],
                  eventMask: int) -> None:  # noqa: N803 - pysyncobj's name
        before = self._watched.get(descr, (callback, 0))[1]
        self._watched[descr] = (callback, eventMask)
        # Errors show as readiness (poll reports POLLERR with POLLIN/POLLOUT); the
        # connection finds them on its next read, write or SO_ERROR check.
        if eventMask & _READ and not before & _READ:
            self._loop.add_reader(descr, self._ready, descr, _READ)
        elif before & _READ and not eventMask & _READ:
            self._loop.remove_reader(descr)
        if eventMask & _WRITE and not before & _WRITE:
            self._loop.add_writer(descr, self._ready, descr, _WRITE)
        elif before & _WRITE and not eventMask & _WRITE:
            self._loop.remove_writer(descr)

    def unsubscribe(self, descr: int) -> None:
        _callback, mask = self._watched.pop(descr, (None, 0))
        try:
            if mask & _READ:
                self._loop.remove_reader(descr)
            if mask & _WRITE:
                self._loop.remove_writer(descr)
        except OSError:
            # pysyncobj closes a connection's socket before it unsubscribes it. The kernel
            # has dropped the closed descriptor from the selector already; the selector's
            # failed update has forgotten it too. Only the loop's handles are left to drop.
            self._loop.remove_reader(descr)
            self._loop.remove_writer(descr)

    def poll(self, timeout: float) -> None:
        del timeout  # the loop waits for events; a tick only runs what is due

    def _ready(self, descr: int, event: int) -> None:
        watched = self._watched.get(descr)
        if watched is not None:
            watched[0](descr, event)
        self._on_event()

    def close(self) -> None:
        for descr in list(self._watched):
            self.unsubscribe(descr)


def install() -> None:
    """Let `SyncObjConf.pollerType` carry a poller object (pysyncobj builds its own
    from a name otherwise). Idempotent."""
    create = pysyncobj_syncobj.createPoller
    if getattr(create, "takes_instances", False):
        return

    def create_poller(poller_type: Any) -> Poller:
        if isinstance(poller_type, Poller):
            return poller_type
        return pysyncobj_poller.createPoller(poller_type)

    create_poller.takes_instances = True  # type: ignore[attr-defined]
    pysyncobj_syncobj.createPoller = create_poller


class LoopTicker:
    """Runs `tick` on the loop: soon after every `request`, and every `period` seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: Callable[[], None],
                 period: float) -> None:
        self._loop = loop
        self._tick = tick
        self._period = period
        self._soon = False
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    def start(self) -> None:
        self._timer = self._loop.call_later(self._period, self._on_timer)

    def request(self) -> None:
        if not self._soon and not self._stopped:
            self._soon = True
            self._loop.call_soon(self._run)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        if self._stopped:
            return
        self._timer = self._loop.call_later(self._period, self._on_timer)
        self._run()

    def _run(self) -> None:
        self._soon = False
        if self._stopped:
            return
        try:
            self._tick()
        except Exception:
            # As pysyncobj's own tick thread does: report, and tick again next time.
            log.exception("raft tick failed")
