"""Audit records served by a follower are committed in the leader's entries: a real 3-member
pysyncobj cluster in this process (127.0.0.1), one AuditCommitter per member."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cluster import commands
from cluster.raft_node import RaftNode, RaftSettings
from cluster.state import ApplyResult, KmsState
from kmsd.audit.committer import AuditCommitter, AuditItem, AuditUnavailable, checked_items

BASE_PORT = 21870


def _item(node: str, n: int = 0) -> AuditItem:
    event = {"eventID": str(uuid.uuid4()), "eventName": "Decrypt", "n": n}
    event_bytes = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
    return (event_bytes, node, (), ())


class _Member:
    def __init__(self, tmp_path, index: int, ports: list[int]) -> None:
        self.node_id = f"node-{index}"
        self.state = KmsState()
        self.address = f"127.0.0.1:{ports[index]}"
        self.entries: list[commands.AppendAudit] = []
        self.raft = RaftNode(RaftSettings(
            self_address=self.address,
            peer_addresses=tuple(f"127.0.0.1:{p}" for p in ports if p != ports[index]),
            data_dir=str(tmp_path / self.node_id), password="test-secret"),
            self.state, self._on_applied)
        self.audit = AuditCommitter(self.raft, timeout=3.0)

    def _on_applied(self, command: commands.Command, result: ApplyResult) -> None:
        if isinstance(command, commands.AppendAudit):
            self.entries.append(command)
            self.audit.on_applied(command, result)


async def _until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def _run(tmp_path, offset: int, scenario: Callable[[list[_Member]], Awaitable[None]]) -> None:
    ports = [BASE_PORT + offset + i for i in range(3)]

    async def main() -> None:
        members = [_Member(tmp_path, i, ports) for i in range(3)]
        for member in members:
            member.audit.attach(asyncio.get_running_loop())
            member.raft.start()
        try:
            await _until(lambda: all(m.raft.has_leader for m in members), 20, "a leader")
            await scenario(members)
        finally:
            for member in members:
                member.raft.stop()
    asyncio.run(main())


def _roles(members: list[_Member]) -> tuple[_Member, list[_Member]]:
    leader = next(m for m in members if m.raft.is_leader)
    return leader, [m for m in members if m is not leader]


def test_followers_records_are_committed_in_the_leaders_entries(tmp_path) -> None:
    async def scenario(members: list[_Member]) -> None:
        leader, followers = _roles(members)
        for round_ in range(8):
            items = {m.node_id: [_item(m.node_id, round_ * 100 + n) for n in range(15)]
                     for m in members}
            results = await asyncio.gather(*(
                m.audit.commit(item) for m in members for item in items[m.node_id]))
            served = [item for m in members for item in items[m.node_id]]
            for item, record in zip(served, results, strict=True):
                assert record.event_bytes == item[0]  # each request gets its own record
                assert record.node == item[1]
            assert len({r.seq for r in results}) == len(results)
        # Followers sent their batches to the leader: no entry was proposed by a follower
        # alone, and entries carried several nodes' records at once.
        await _until(lambda: all(len(m.entries) == len(leader.entries) for m in members), 10,
                     "every member applied every entry")
        mixed = [e for e in leader.entries if len({entry[1] for entry in e.entries}) > 1]
        assert mixed, "no entry held records of more than one node"
        batches = sum(m.audit.metrics.batches for m in members)
        assert len(leader.entries) < batches
        for follower in followers:
            assert follower.audit.metrics.failures == 0
            assert not follower.audit._awaiting
    _run(tmp_path, 0, scenario)


def test_a_batch_the_leader_refuses_fails_on_the_follower_at_once(tmp_path) -> None:
    async def scenario(members: list[_Member]) -> None:
        _leader, followers = _roles(members)
        follower = followers[0]
        bad: AuditItem = (b"not an event", follower.node_id, (), ())
        started = time.monotonic()
        with pytest.raises(AuditUnavailable, match="refused"):
            await follower.audit.commit(bad)
        assert time.monotonic() - started < 2.0  # refused, not timed out (3 s)
        # A good record from the same follower still commits.
        record = await follower.audit.commit(_item(follower.node_id))
        assert record.node == follower.node_id
    _run(tmp_path, 3, scenario)


def test_a_batch_sent_to_a_leader_that_dies_fails_and_the_survivors_go_on(tmp_path) -> None:
    async def scenario(members: list[_Member]) -> None:
        leader, followers = _roles(members)
        leader.raft.stop()
        # Sent before the followers notice: it reaches nobody, and fails once they do.
        outcome: list[Any] = []
        started = time.monotonic()
        try:
            outcome.append(await followers[0].audit.commit(_item(followers[0].node_id)))
        except AuditUnavailable as exc:
            outcome.append(exc)
        assert time.monotonic() - started < 6.0
        await _until(lambda: any(m.raft.is_leader for m in followers), 20, "a new leader")
        new_leader, survivor = sorted(followers, key=lambda m: not m.raft.is_leader)
        await _until(lambda: survivor.raft.has_leader, 10, "the survivor sees the new leader")
        record = await survivor.audit.commit(_item(survivor.node_id))
        assert record.node == survivor.node_id
        assert (await new_leader.audit.commit(_item(new_leader.node_id))).seq > record.seq
    _run(tmp_path, 6, scenario)


@pytest.mark.parametrize("items", [
    None, [], "x", [("{}",)], [(b"{}", 1, (), ())], [(b"{}", "n", (("k", "1"),), ())],
    [(b"{}", "n", (), (1,))], [(b"not json", "n", (), ())], [(b'{"a":1}\n', "n", (), ())],
    [(b"{}", "n", ((1, 2, 3),), ())],
])
def test_forwarded_items_of_the_wrong_shape_are_refused(items: Any) -> None:
    assert checked_items(items) is None


def test_forwarded_items_of_the_right_shape_come_back_as_tuples() -> None:
    assert checked_items([[b'{"a":1}', "node-1", [["k", 3]], ["k", "Decrypt", "t", "e", "r"]]]
                         ) == [(b'{"a":1}', "node-1", (("k", 3),), ("k", "Decrypt", "t", "e",
                                                                     "r"))]
