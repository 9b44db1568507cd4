"""Log compaction through a real single-member pysyncobj node: the state's snapshot is built
in the child pysyncobj forks, not in the tick, and a restart restores it."""

from __future__ import annotations

import asyncio
import os

from cluster.raft_node import RaftNode
from cluster.state import KmsState
from tests.unit.cluster.single_member import settings, wait_until


class _CountingState(KmsState):
    def __init__(self) -> None:
        super().__init__()
        self.snapshots_built_here = 0

    def to_snapshot(self) -> bytes:
        self.snapshots_built_here += 1
        return super().to_snapshot()


def test_compaction_builds_the_snapshot_in_a_child_and_a_restart_restores_it(tmp_path) -> None:
    async def scenario() -> None:
        state = _CountingState()
        node = RaftNode(settings(tmp_path, 21750), state)
        node.start()
        try:
            await wait_until(lambda: node.is_leader, 20, "a single member elects itself")
            for _ in range(30):
                await node.barrier(timeout=10)
            applied = state.applied_count
            snapshot = os.path.join(str(tmp_path), "raft.snapshot")
            assert not os.path.exists(snapshot)
            node.force_compaction()
            await wait_until(lambda: os.path.exists(snapshot)
                        and node.status()["log_length"] < 10, 30, "the log is compacted")
            assert state.snapshots_built_here == 0  # built in the forked child
        finally:
            node.stop()

        restored = KmsState()
        again = RaftNode(settings(tmp_path, 21751), restored)
        again.start()
        try:
            await wait_until(lambda: restored.applied_count >= applied, 20, "the snapshot loads")
            assert restored.to_snapshot() == KmsState.to_snapshot(state)
        finally:
            again.stop()

    asyncio.run(scenario())
