"""A follower must not apply its own unverified entries while a leader streams it a snapshot.

These drive pysyncobj's real message handler and apply loop (one SyncObj, no
auto tick) with the messages a leader sends, in the order the chaos runs
produced: a deposed leader holds entries of its old term that were never
committed, and the new leader, whose log is compacted past them, starts a
snapshot transfer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated

from cluster.syncobj_guard import GuardedSyncObj


class _Counter(SyncObjConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.applied = 0

    @replicated
    def increment(self) -> int:
        self.applied += 1
        return self.applied


def _follower(cls: type[SyncObj], port: int, peers: int = 2) -> tuple[SyncObj, _Counter]:
    counter = _Counter()
    conf = SyncObjConf(autoTick=False, password="p", dynamicMembershipChange=True)
    node = cls(f"127.0.0.1:{port}", [f"127.0.0.1:{port + i}" for i in range(1, peers + 1)],
               conf=conf, consumers=[counter])
    return node, counter


def _command_bytes(node: SyncObj, counter: _Counter) -> bytes:
    counter.increment()  # queued on the node, as a client call would be
    command, _callback = node._SyncObj__commandsQueue.get_nowait()
    return command


def _deliver(node: SyncObj, message: dict[str, Any]) -> None:
    sender = sorted(node._SyncObj__otherNodes, key=lambda n: n.id)[0]
    node._SyncObj__onMessageReceived(sender, message)
    node.doTick(0.0)


def _stale_entries_then_snapshot_start(node: SyncObj, counter: _Counter) -> tuple[int, int]:
    base = node._SyncObj__getCurrentLogIndex()
    base_term = node._SyncObj__getCurrentLogTerm()
    # Term 1: this node leads, appends two entries (after its no-op) and is cut off before
    # any peer has them.
    node._SyncObj__raftCurrentTerm = 1
    node._SyncObj__onBecomeLeader()
    counter.increment()
    counter.increment()
    node.doTick(0.0)
    assert node._SyncObj__getCurrentLogIndex() == base + 3
    assert counter.applied == 0
    # Term 2: the new leader committed far beyond, compacted, and starts a snapshot.
    _deliver(node, {"type": "append_entries", "term": 2, "commit_index": base + 50,
                    "serialized": None})
    return base, base_term


@pytest.mark.parametrize("port", [21710])
def test_unguarded_pysyncobj_applies_uncommitted_entries_during_a_snapshot(port: int) -> None:
    # Pins the hole in the pinned pysyncobj: if this stops failing, the guard is moot.
    node, counter = _follower(SyncObj, port)
    try:
        _stale_entries_then_snapshot_start(node, counter)
        assert counter.applied == 2
    finally:
        node.destroy()


@pytest.mark.parametrize("port", [21720])
def test_guarded_follower_applies_nothing_until_its_log_is_verified(port: int) -> None:
    node, counter = _follower(GuardedSyncObj, port)
    try:
        base, base_term = _stale_entries_then_snapshot_start(node, counter)
        assert counter.applied == 0
        status = node.getStatus()
        assert status["commit_idx"] == base
        assert status["leader_commit_idx"] == base + 50  # readiness still sees the lag

        # The term-2 leader's regular batch replaces the stale entries; only its entry applies.
        command = _command_bytes(node, counter)
        _deliver(node, {"type": "append_entries", "term": 2, "commit_index": base + 1,
                        "entries": [(command, base + 1, 2)],
                        "prevLogIdx": base, "prevLogTerm": base_term})
        assert counter.applied == 1
        assert node.getStatus()["commit_idx"] == base + 1
        assert node._SyncObj__getCurrentLogIndex() == base + 1
    finally:
        node.destroy()


@pytest.mark.parametrize("port", [21730])
def test_guarded_follower_ignores_snapshot_messages_of_an_older_term(port: int) -> None:
    node, counter = _follower(GuardedSyncObj, port)
    try:
        base, _ = _stale_entries_then_snapshot_start(node, counter)
        _deliver(node, {"type": "append_entries", "term": 1, "commit_index": base + 99,
                        "serialized": None})
        assert node.getStatus()["leader_commit_idx"] == base + 50
        assert counter.applied == 0
    finally:
        node.destroy()


def _entries_from_a_leader_that_has_not_committed(node: SyncObj, counter: _Counter, *,
                                                   term: int, entry_terms: list[int]) -> int:
    base = node._SyncObj__getCurrentLogIndex()
    command = _command_bytes(node, counter)
    _deliver(node, {"type": "append_entries", "term": term, "commit_index": base,
                    "entries": [(command, base + i, t) for i, t in enumerate(entry_terms, 1)],
                    "prevLogIdx": base, "prevLogTerm": node._SyncObj__getCurrentLogTerm()})
    return base


@pytest.mark.parametrize(("cls", "port", "commits"), [
    (SyncObj, 21880, False), (GuardedSyncObj, 21883, True)])
def test_a_follower_of_three_commits_entries_of_the_leaders_term_as_they_arrive(
        cls: type[SyncObj], port: int, commits: bool) -> None:
    # The leader and this follower hold them: a majority of three.
    node, counter = _follower(cls, port)
    try:
        base = _entries_from_a_leader_that_has_not_committed(node, counter, term=1,
                                                             entry_terms=[1, 1])
        assert counter.applied == (2 if commits else 0)
        assert node.getStatus()["commit_idx"] == (base + 2 if commits else base)
        assert node.getStatus()["leader_commit_idx"] == base
    finally:
        node.destroy()


@pytest.mark.parametrize("port", [21886])
def test_an_entry_of_an_earlier_term_waits_for_one_of_the_leaders_term(port: int) -> None:
    node, counter = _follower(GuardedSyncObj, port)
    try:
        base = _entries_from_a_leader_that_has_not_committed(node, counter, term=2,
                                                             entry_terms=[1])
        assert counter.applied == 0
        assert node.getStatus()["commit_idx"] == base
        _entries_from_a_leader_that_has_not_committed(node, counter, term=2, entry_terms=[2])
        assert counter.applied == 2
    finally:
        node.destroy()


@pytest.mark.parametrize("port", [21890])
def test_a_follower_of_five_waits_for_the_leaders_commit_index(port: int) -> None:
    node, counter = _follower(GuardedSyncObj, port, peers=4)
    try:
        base = _entries_from_a_leader_that_has_not_committed(node, counter, term=1,
                                                             entry_terms=[1, 1])
        assert counter.applied == 0
        _deliver(node, {"type": "append_entries", "term": 1, "commit_index": base + 1,
                        "entries": [], "prevLogIdx": base + 2, "prevLogTerm": 1})
        assert counter.applied == 1
    finally:
        node.destroy()


def _log(node: SyncObj) -> list[tuple[int, int]]:
    return [(index, term) for _command, index, term in node._SyncObj__getEntries(1)]


def _acks(node: SyncObj) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    transport = node._SyncObj__transport
    original = transport.send

    def send(peer: Any, message: dict[str, Any]) -> bool:
        if message.get("type") == "next_node_idx":
            sent.append(message)
        return original(peer, message)

    transport.send = send
    return sent


def _append(node: SyncObj, command: bytes, *, term: int, prev: int, indexes: range,
            commit: int, entry_term: int | None = None) -> None:
    """Deliver entries at `indexes` (of `entry_term`, by default the message's `term`)."""
    terms = term if entry_term is None else entry_term
    _deliver(node, {"type": "append_entries", "term": term, "commit_index": commit,
                    "entries": [(command, i, terms) for i in indexes],
                    "prevLogIdx": prev, "prevLogTerm": node._SyncObj__getEntries(prev)[0][2]})


# The first two of four committed entries of term 1 come again: from the same leader (after
# a reconnect, say), or from the leader of term 2, which holds what term 1 committed.
@pytest.mark.parametrize(("cls", "port", "resending_term", "truncates"), [
    (SyncObj, 21895, 1, True), (GuardedSyncObj, 21897, 1, False),
    (SyncObj, 21794, 2, True), (GuardedSyncObj, 21796, 2, False)])
def test_a_resent_message_truncates_nothing_committed_the_follower_holds(
        cls: type[SyncObj], port: int, resending_term: int, truncates: bool,
        caplog: pytest.LogCaptureFixture) -> None:
    node, counter = _follower(cls, port)
    try:
        acks = _acks(node)
        base = node._SyncObj__getCurrentLogIndex()
        command = _command_bytes(node, counter)
        _append(node, command, term=1, prev=base, indexes=range(base + 1, base + 5),
                commit=base + 4)
        assert counter.applied == 4
        with caplog.at_level(logging.CRITICAL):
            _append(node, command, term=resending_term, prev=base,
                    indexes=range(base + 1, base + 3), commit=base + 4, entry_term=1)
        alarms = [r for r in caplog.records if "truncating already-applied" in r.getMessage()]
        assert bool(alarms) is truncates
        assert node._SyncObj__getCurrentLogIndex() == (base + 2 if truncates else base + 4)
        assert acks[-1]["success"] and acks[-1]["next_node_idx"] == (
            base + 3 if truncates else base + 5)
        assert counter.applied == 4
    finally:
        node.destroy()


@pytest.mark.parametrize("port", [21899])
def test_a_resent_message_appends_only_what_is_new_and_truncates_at_a_conflict(
        port: int) -> None:
    node, counter = _follower(GuardedSyncObj, port, peers=4)  # commits only on the leader's word
    try:
        acks = _acks(node)
        base = node._SyncObj__getCurrentLogIndex()
        command = _command_bytes(node, counter)
        _append(node, command, term=1, prev=base, indexes=range(base + 1, base + 3),
                commit=base)
        # Overlapping: two held, two new.
        _append(node, command, term=1, prev=base, indexes=range(base + 1, base + 5),
                commit=base)
        assert _log(node)[-4:] == [(base + i, 1) for i in range(1, 5)]
        assert acks[-1]["next_node_idx"] == base + 5
        # A leader of term 2 holds another entry at base + 3: from there on, this log goes.
        _deliver(node, {"type": "append_entries", "term": 2, "commit_index": base,
                        "entries": [(command, base + 2, 1), (command, base + 3, 2)],
                        "prevLogIdx": base + 1, "prevLogTerm": 1})
        assert _log(node)[-3:] == [(base + 1, 1), (base + 2, 1), (base + 3, 2)]
        assert acks[-1]["next_node_idx"] == base + 4
        assert counter.applied == 0
    finally:
        node.destroy()


def _single_member_leader(cls: type[SyncObj], port: int) -> tuple[SyncObj, _Counter]:
    counter = _Counter()
    conf = SyncObjConf(autoTick=False, password="p", appendEntriesUseBatch=False)
    node = cls(f"127.0.0.1:{port}", [], conf=conf, consumers=[counter])
    deadline = time.monotonic() + 10
    while not node._isLeader() or node.getStatus()["last_applied"] < 1:
        assert time.monotonic() < deadline, "a single member elects itself"
        node.doTick(0.05)
    return node, counter


@pytest.mark.parametrize(("cls", "port", "waits"), [
    (SyncObj, 21740, True), (GuardedSyncObj, 21741, False)])
def test_a_single_member_leader_commits_without_sleeping_a_tick(
        cls: type[SyncObj], port: int, waits: bool) -> None:
    node, counter = _single_member_leader(cls, port)
    try:
        results: list[Any] = []
        # As with the tick thread: the submission wakes a tick sleeping in its poller,
        # and that tick ends; the command is appended by the next one.
        sleeping_tick = threading.Thread(target=node.doTick, args=(5.0,))
        sleeping_tick.start()
        time.sleep(0.2)
        counter.increment(callback=lambda result, error: results.append((result, error)))
        sleeping_tick.join(timeout=10)
        assert results == []
        started = time.monotonic()
        node.doTick(2.0)  # appends the command, then sleeps in the poller unless woken
        slept = time.monotonic() - started
        node.doTick(0.0)  # commits and applies
        assert results == [(1, 0)]
        assert (slept >= 1.5) is waits, slept
    finally:
        node.destroy()


def _leader_of_three(cls: type[SyncObj], port: int) -> tuple[SyncObj, Any]:
    # Made leader directly (its peers never run): only its bookkeeping is under test.
    node, _counter = _follower(cls, port)
    node._SyncObj__raftCurrentTerm = 1
    node._SyncObj__onBecomeLeader()
    assert node._isLeader()
    follower = sorted(node._SyncObj__otherNodes, key=lambda n: n.id)[0]
    return node, follower


def _ack(node: SyncObj, follower: Any, next_index: int, *, success: bool = True,
         reset: bool = False) -> None:
    node._SyncObj__onMessageReceived(follower, {
        "type": "next_node_idx", "next_node_idx": next_index, "reset": reset,
        "success": success})


@pytest.mark.parametrize(("cls", "port", "regresses"), [
    (SyncObj, 21770, True), (GuardedSyncObj, 21773, False)])
def test_a_late_acknowledgement_does_not_make_the_leader_resend(
        cls: type[SyncObj], port: int, regresses: bool) -> None:
    node, follower = _leader_of_three(cls, port)
    try:
        sent = node._SyncObj__getCurrentLogIndex()
        # Entries up to `sent` + 2 went out (no batching: each at once); then the
        # acknowledgement of the earlier message arrives.
        node._SyncObj__raftNextIndex[follower] = sent + 3
        _ack(node, follower, sent + 1)
        assert node._SyncObj__raftMatchIndex[follower] == sent
        assert (node._SyncObj__raftNextIndex[follower] == sent + 1) is regresses
        if not regresses:
            assert node._SyncObj__raftNextIndex[follower] == sent + 3
            # A refusal still moves it back: that is how a follower that lost a message
            # is caught up.
            _ack(node, follower, sent - 1, success=False, reset=True)
            assert node._SyncObj__raftNextIndex[follower] == sent - 1
    finally:
        node.destroy()
