"""The primary's side of API workers against a real single-member pysyncobj node, with the
worker's end (kmsd.api_workers.worker.PrimaryLink) in this process on a socketpair."""

from __future__ import annotations

import asyncio
import itertools
import pickle
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest

from cluster import commands
from cluster.raft_node import RaftNode, RaftSettings
from cluster.state import Applied, KmsState
from kmsd.api_workers import wire
from kmsd.api_workers.hub import WorkerHub
from kmsd.api_workers.worker import PrimaryLink, RemoteAuditCommitter, RemoteRaft
from kmsd.audit.chain import ChainHead, canonical_bytes
from kmsd.audit.committer import AuditCommitter
from kmsd.metric_tally import RequestTallies
from kmsd.metrics import HSM_BUCKETS, LATENCY_BUCKETS
from tests.unit.cluster.test_raft_snapshot import _CountingState


def _register(n: int) -> commands.RegisterNode:
    return commands.RegisterNode(f"node-{n}", "az-a", f"127.0.0.1:{30000 + n}",
                                 f"http://127.0.0.1:{31000 + n}", f"http://127.0.0.1:{32000 + n}")


def _without_chain(state: KmsState) -> dict[str, Any]:
    """A state's snapshot minus the audit chain (a worker's copy does not keep the chain)."""
    raw = msgpack.unpackb(state.to_snapshot())
    raw.pop("audit")
    raw.pop("applied_count")  # counts the audit batches too, which a copy is not given
    return raw


async def _until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def _metrics() -> bytes:
    return b"metrics"


class _Primary:
    def __init__(self, tmp_path, port: int) -> None:
        self.state = _CountingState()
        self.raft = RaftNode(RaftSettings(self_address=f"127.0.0.1:{port}", peer_addresses=(),
                                          data_dir=str(tmp_path), password="test-secret"),
                             self.state)
        self.audit = AuditCommitter(self.raft)
        self.tallies = RequestTallies(LATENCY_BUCKETS, HSM_BUCKETS)
        self.hub = WorkerHub(0, [], self.raft, self.state, self.audit,
                             lambda: {"not_ready": None, "has_leader": self.raft.has_leader},
                             _metrics, lambda: (200, {"ready": True}),
                             self.tallies.merge_wire)

    def requests_seen(self) -> dict[tuple[str, str], int]:
        return {labels: int(sum(row[:-1])) for labels, row in self.tallies.requests.rows.items()}

    async def __aenter__(self) -> _Primary:
        self.raft.start()
        await _until(lambda: self.raft.has_leader, 10, "a leader")
        await self.hub.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.hub.stop()
        self.raft.stop()

    async def worker(self, index: int = 0) -> tuple[PrimaryLink, KmsState, asyncio.Task[None]]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self.hub.attach(index, reader, writer)
        state = KmsState()
        their_reader, their_writer = await asyncio.open_unix_connection(sock=theirs)
        link = PrimaryLink(their_reader, their_writer, state, lambda _c, _r: None)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.synced.wait(), 10)
        their_writer.write(wire.frame(wire.READY, b""))
        await asyncio.wait_for(link.may_serve.wait(), 10)
        return link, state, task

    async def stalled_worker(self, index: int, ready: bool = True) -> socket.socket:
        """A worker that never reads what it is sent (and so never answers a fence); `ready`:
        it said it is about to serve."""
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self.hub.attach(index, reader, writer)
        if ready:
            theirs.sendall(wire.frame(wire.READY, b""))
        return theirs


def _run(tmp_path, port: int, scenario: Callable[[_Primary], Awaitable[None]]) -> None:
    async def main() -> None:
        async with _Primary(tmp_path, port) as primary:
            await scenario(primary)
    asyncio.run(main())


def test_a_new_worker_starts_from_the_state_as_applied_and_follows_every_entry(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        for n in range(3):
            await primary.hub.submit(_register(n))
        _link, copy, _task = await primary.worker()
        assert _without_chain(copy) == _without_chain(primary.state)
        # Encoded in a forked child, outside the Raft tick (this count is the parent's,
        # taken before the comparison above encoded it once).
        assert primary.state.snapshots_built_here == 1
        for n in range(3, 8):
            await primary.hub.submit(_register(n))
        await primary.audit.commit((canonical_bytes({"eventName": "Decrypt"}), "node-0", (),
                                    ("key-1", "Decrypt", "2026-11-28T00:00:00Z", "e", "r")))
        await _until(lambda: _without_chain(copy) == _without_chain(primary.state), 5,
                     "the copy to follow")
        assert copy.key_usage["key-1"].operation == "Decrypt"
    _run(tmp_path, 21761, scenario)


def test_a_write_is_answered_only_once_every_worker_applied_it(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        workers = [await primary.worker(i) for i in range(2)]  # (kept: tasks are weak)
        copies = [copy for _link, copy, _task in workers]
        for n in range(20):
            await primary.hub.submit(_register(n))
            # No await in between: the copies had it before the answer.
            assert all(f"node-{n}" in copy.nodes for copy in copies)
    _run(tmp_path, 21762, scenario)


def test_a_worker_that_stops_reading_is_dropped_and_writes_go_on(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        primary.hub.fence_timeout = 0.3
        _link, copy, _task = await primary.worker(0)
        stalled = await primary.stalled_worker(1)
        await _until(lambda: len(primary.hub._subscribers) == 2, 5, "both subscribed")
        started = time.monotonic()
        await primary.hub.submit(_register(1))
        assert time.monotonic() - started < 3
        assert "node-1" in copy.nodes
        assert len(primary.hub._subscribers) == 1  # the stalled one is out of the feed
        await primary.hub.submit(_register(2))  # and no longer holds writes up
        stalled.close()
    _run(tmp_path, 21763, scenario)


def test_after_a_snapshot_install_the_workers_leave_the_feed_and_start_again(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        link, _copy, task = await primary.worker(0)
        done, loop = asyncio.Event(), asyncio.get_running_loop()
        # As pysyncobj calls it: in the tick, right after installing the snapshot.
        primary.raft.call_on_tick(lambda: (primary.hub._on_restored(),
                                           loop.call_soon_threadsafe(done.set)))
        await asyncio.wait_for(done.wait(), 5)
        assert primary.hub._subscribers == ()
        await asyncio.wait_for(task, 5)  # the primary closed its end: the worker's feed ends
        await primary.hub.submit(_register(1))  # no fence waits on a replaced worker
    _run(tmp_path, 21766, scenario)


def test_a_worker_still_starting_holds_no_write_up(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        starting = await primary.stalled_worker(0, ready=False)
        await _until(lambda: len(primary.hub._subscribers) == 1, 5, "subscribed")
        started = time.monotonic()
        for n in range(5):
            await primary.hub.submit(_register(n))
        assert time.monotonic() - started < primary.hub.fence_timeout
        assert len(primary.hub._subscribers) == 1  # still fed: it will serve from this copy
        starting.close()
    _run(tmp_path, 21765, scenario)


def test_a_workers_writes_and_audit_records_go_through_the_primary(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        link, copy, _task = await primary.worker()
        result = await RemoteRaft(link).submit(_register(7))
        assert isinstance(result, Applied)
        assert "node-7" in copy.nodes and "node-7" in primary.state.nodes
        committer = RemoteAuditCommitter(link)
        chained = await asyncio.gather(*(committer.commit(
            (canonical_bytes({"eventName": "Encrypt", "n": n}), "node-0", (), ()))
            for n in range(5)))
        assert [r.seq for r in chained] == sorted(r.seq for r in chained)
        assert primary.state.audit.head.seq == chained[-1].seq
        link.counts = lambda: {"cached_handles": 3}
        reporter = asyncio.create_task(link.report_forever())
        link.observe("Encrypt", "ok", 0.001)
        link.observe_hsm("decrypt", 0.0001, False)
        await _until(lambda: primary.requests_seen() == {("Encrypt", "ok"): 1}, 3,
                     "the observations reported")
        assert primary.tallies.hsm.rows[("decrypt", False)][-1] == pytest.approx(0.0001)
        await _until(lambda: primary.hub.reported("cached_handles") == 3, 3, "counts reported")
        reporter.cancel()
    _run(tmp_path, 21764, scenario)


def test_gathering_the_observations_counts_every_request_answered_before_it(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        link, _copy, _task = await primary.worker()
        link.counts = lambda: {"cache_hits": 2}
        for _ in range(3):
            link.observe("Decrypt", "ok", 0.002)
        link.observe("Decrypt", "AccessDeniedException", 0.001)
        # No report is due yet: what the scrape sees comes ahead of the worker's answer.
        await primary.hub.gather_observed(timeout=3)
        assert primary.requests_seen() == {("Decrypt", "ok"): 3,
                                           ("Decrypt", "AccessDeniedException"): 1}
        assert primary.hub.reported("cache_hits") == 2
        await primary.hub.gather_observed(timeout=3)  # nothing new: nothing counted twice
        assert primary.requests_seen()[("Decrypt", "ok")] == 3

        # A worker that does not answer delays a scrape by the timeout, and is not dropped.
        stalled = await primary.stalled_worker(1)
        await _until(lambda: any(s.serving for s in primary.hub._subscribers
                                 if s.index == 1), 5, "the stalled one serving")
        started = time.monotonic()
        await primary.hub.gather_observed(timeout=0.3)
        assert 0.25 < time.monotonic() - started < 2
        assert sorted(s.index for s in primary.hub._subscribers) == [0, 1]
        stalled.close()
    _run(tmp_path, 21791, scenario)


def test_an_audit_reply_gives_each_records_place_and_the_worker_rebuilds_it(tmp_path) -> None:
    async def scenario(primary: _Primary) -> None:
        events = [canonical_bytes({"eventName": "Encrypt", "n": n, "pad": "x" * 2000})
                  for n in range(5)]
        reply = await primary.hub._call("audit", [[e, "node-0", [], []] for e in events])
        # The event bytes stay with the worker that sent them: nothing of them comes back.
        assert len(pickle.dumps(reply)) < 1000
        records = [wire.record_from_reply(r, (e, "node-0", (), ()))
                   for r, e in zip(reply, events, strict=True)]
        assert all(r is not None and r.computed_hash() == r.hash for r in records)
        assert [r.event_bytes for r in records] == events
        assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
        assert primary.state.audit.head == ChainHead(records[-1].seq, records[-1].hash)

        # One unfit record spoils the entry it is in: every record of it fails, none raises.
        refused = await primary.hub._call(
            "audit", [[events[0] + b" ", "node-0", [], []], [b"not json", "node-0", [], []]])
        assert [kind for kind, _message in refused] == ["AuditUnavailable"] * 2
        assert all(wire.record_from_reply(r, (b"", "node-0", (), ())) is None for r in refused)
        assert primary.state.audit.head.seq == records[-1].seq
    _run(tmp_path, 21790, scenario)
