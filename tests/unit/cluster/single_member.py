"""A real single-member Raft node for tests: its settings, and waiting on it from the loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from cluster.raft_node import RaftSettings


def settings(tmp_path, port: int) -> RaftSettings:
    return RaftSettings(self_address=f"127.0.0.1:{port}", peer_addresses=(),
                        data_dir=str(tmp_path), password="test-secret")


async def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)
