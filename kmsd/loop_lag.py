"""How late a node's event loop runs what is due: the loop's lag, measured.

Owns `LoopLagProbe`: a timer due every `interval` seconds on the loop, and how late each
one ran, handed to an `observe` callback (the node's `kmsd_event_loop_lag_seconds`).

Why: the node's loop serves requests and also runs the Raft ticks (cluster/loop_tick.py).
Anything that holds the loop for long (a tick applying a large entry, a snapshot loaded,
a slow call that should have left the loop) delays every request the node holds and its
Raft messages: a leader's heartbeats, a follower's acknowledgements. Past the election
timeout (0.4-1.4 s) a stalled follower stands for election, and a stalled leader is
deposed. This shows such stalls, and the usual sub-millisecond lag, before they do that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

INTERVAL_SECONDS = 0.25


class LoopLagProbe:
    def __init__(self, observe: Callable[[float], None],
                 interval: float = INTERVAL_SECONDS) -> None:
        self._observe = observe
        self._interval = interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _schedule(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + self._interval
        self._handle = self._loop.call_at(self._due, self._wake)

    def _wake(self) -> None:
        assert self._loop is not None
        # The loop runs timers up to its clock's resolution early: never a negative lag.
        self._observe(max(0.0, self._loop.time() - self._due))
        self._schedule()
