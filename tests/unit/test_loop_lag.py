"""kmsd.loop_lag: how late the event loop runs a timer, observed every interval."""

from __future__ import annotations

import asyncio
import time

from kmsd.loop_lag import LoopLagProbe


def test_an_idle_loop_shows_little_lag_and_a_blocked_one_shows_the_block() -> None:
    async def scenario() -> list[float]:
        lags: list[float] = []
        probe = LoopLagProbe(lags.append, interval=0.02)
        probe.start(asyncio.get_running_loop())
        await asyncio.sleep(0.15)
        idle = len(lags)
        assert idle >= 3
        time.sleep(0.3)  # holds the loop, as a long tick or a slow inline call would
        await asyncio.sleep(0.05)
        probe.stop()
        count = len(lags)
        await asyncio.sleep(0.06)
        assert len(lags) == count  # stopped: no timer left
        return lags

    lags = asyncio.run(scenario())
    assert all(lag >= 0 for lag in lags)
    assert max(lags) >= 0.25
    assert sorted(lags)[len(lags) // 2] < 0.1  # most turns ran close to due
