"""Log compaction through a real single-member pysyncobj node: the state's snapshot is built
in the child pysyncobj forks, not in the tick, and a restart restores it."""

from __future__ import annotations

import asyncio
import os
import time

from cluster.raft_node import RaftNode, RaftSettings
from cluster.state import KmsState


class _CountingState(KmsState):
    def __init__(self) -> None:
        super().__init__()
        self.snapshots_built_here = 0

    def to_snapshot(self) -> bytes:
        self.snapshots_built_here += 1
        return super().to_snapshot()


def _settings(tmp_path, port: int) -> RaftSettings:
    return RaftSettings(self_address=f"127.0.0.1:{port}", peer_addresses=(),
                        data_dir=str(tmp_path), password="test-secret")


async def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def test_compaction_builds_the_snapshot_in_a_child_and_a_restart_restores_it(tmp_path) -> None:
    async def scenario() -> None:
        state = _CountingState()
        node = RaftNode(_settings(tmp_path, 21750), state)
        node.start()
        try:
            await _wait(lambda: node.is_leader, 20, "a single member elects itself")
            for _ in range(30):
                await node.barrier(timeout=10)
            applied = state.applied_count
            snapshot = os.path.join(str(tmp_path), "raft.snapshot")
            assert not os.path.exists(snapshot)
            node.force_compaction()
            await _wait(lambda: os.path.exists(snapshot)
                        and node.status()["log_length"] < 10, 30, "the log is compacted")
            assert state.snapshots_built_here == 0  # built in the forked child
        finally:
            node.stop()

        restored = KmsState()
        again = RaftNode(_settings(tmp_path, 21751), restored)
        again.start()
        try:
            await _wait(lambda: restored.applied_count >= applied, 20, "the snapshot loads")
            assert restored.to_snapshot() == KmsState.to_snapshot(state)
        finally:
            again.stop()

    asyncio.run(scenario())
