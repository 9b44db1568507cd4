"""Group commit of audit records through Raft: fail-closed, one batch in flight on the
leader, and a follower's batches forwarded to it.

Every request's record is handed to `AuditCommitter.commit`, which resolves
once the record is committed by a Raft majority and applied on this node,
returning its chained form (seq, hash, and whether the commit-time re-check
revoked it). Records that arrive while a batch is in flight form the next
batch, so a batch grows with load and the chain costs one consensus round per
batch, not per request (FACTS.md §P: one synchronous commit costs ~0.5 ms of
leader CPU; 100 records per entry reach ~76-133k records/s).

Batches are as large as one batch in flight allows: every record that arrives
while a commit is in flight joins the next batch, and `max_batch` is far above
what forms (~10 at 64 concurrent requests). Larger batches would only come from
waiting after each commit: bench/raft_batch_cost.py's committer mode (clients
away ~15 ms between requests, so batches of ~5 form) with a 2 or 5 ms pause
grew batches to 7-10 and cut Raft CPU per record by 3-13%, but every request
waits the pause, and records/s moved by more than that either way from one run
to the next on the shared machine. Not done: the latency is certain, the gain
was not distinguishable from noise.

One batcher for the whole cluster: a follower does not commit its batches itself
(each would be a log entry of its own, and an entry costs ~1.2 ms of CPU across a
3-node cluster however few records it holds: bench/raft_batch_cost.py). It sends
them to the leader over the Raft connection (`kmsd_audit`), and the leader's
committer puts them in its own next entry, so an entry carries the records of
every node. A follower keeps up to two forwarded batches on their way, so its
records wait for about one leader commit, not two. The follower learns its
records are committed when it applies that entry: it finds them by their event
bytes, which are unique (each event has its own id). A forwarded batch fails
(AuditUnavailable: the requests fail, nothing is acknowledged without its
record) when the leader refuses it, when the leader changes before it is
applied, or after the commit timeout. Its records may still commit after a
leader change or a timeout, as any command whose leader is lost might: an audit
record then exists for a request that failed, never the reverse. A failed batch
is not sent again: were the first copy committed too, one request would have two
records.

Never holds plaintext: the entries are canonical CloudTrail-shaped events,
already stripped of every secret member by kmsd.audit.record.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster import commands
from cluster.raft_node import RaftNode, RaftUnavailable
from cluster.state import Applied, ApplyResult, Rejected
from kmsd.audit.chain import CanonicalEncodingError, ChainedRecord, check_event_bytes

AuditItem = tuple[bytes, str, tuple[tuple[str, int], ...], tuple[str, ...]]

FORWARD = "kmsd_audit"
REFUSED = "kmsd_audit_refused"
# The most records one forwarded batch may hold (a committer batch is at most max_batch).
MAX_FORWARDED_ITEMS = 5000
# How often a follower waiting for its forwarded batch looks at who leads.
_LEADER_CHECK_SECONDS = 0.05


class AuditUnavailable(Exception):
    """The record could not be committed: no quorum, or the commit timed out."""


@dataclass
class AuditMetrics:
    batches: int = 0
    records: int = 0
    failures: int = 0
    largest_batch: int = 0
    # Counts of batches by size bucket and commit latency in ms (upper bounds).
    batch_size_buckets: dict[int, int] = field(default_factory=lambda: dict.fromkeys(
        (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), 0))
    latency_ms_buckets: dict[float, int] = field(default_factory=lambda: dict.fromkeys(
        (0.5, 1, 2, 5, 10, 20, 50, 100, 250, 1000, 5000), 0))
    latency_ms_total: float = 0.0

    def observe(self, size: int, latency_ms: float) -> None:
        self.batches += 1
        self.records += size
        self.largest_batch = max(self.largest_batch, size)
        self.latency_ms_total += latency_ms
        for bound in self.batch_size_buckets:
            if size <= bound:
                self.batch_size_buckets[bound] += 1
        for limit in self.latency_ms_buckets:
            if latency_ms <= limit:
                self.latency_ms_buckets[limit] += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "batches": self.batches, "records": self.records, "failures": self.failures,
            "largest_batch": self.largest_batch,
            "mean_batch_size": round(self.records / self.batches, 2) if self.batches else 0,
            "mean_commit_ms": round(self.latency_ms_total / self.batches, 3)
            if self.batches else 0,
            "batch_size_le": {str(k): v for k, v in self.batch_size_buckets.items()},
            "commit_ms_le": {str(k): v for k, v in self.latency_ms_buckets.items()},
        }


class _Forward:
    """A batch a follower sent to the leader: settled as its records are applied here."""

    def __init__(self, event_bytes: list[bytes], done: asyncio.Future[None]) -> None:
        self.event_bytes = event_bytes
        self.unsettled = len(event_bytes)
        self.done = done
        self.refused: str | None = None


def checked_items(items: Any) -> list[AuditItem] | None:
    """Forwarded items in the shape AppendAudit entries have, or None. A peer is
    authenticated, but one malformed record would make the leader's whole entry refused
    (and fail every node's requests in it): refuse the forwarded batch instead."""
    if not isinstance(items, list | tuple) or not 0 < len(items) <= MAX_FORWARDED_ITEMS:
        return None
    checked: list[AuditItem] = []
    try:
        for event_bytes, node, decisions, usage in items:
            check_event_bytes(event_bytes)
            if type(node) is not str:
                return None
            pairs = tuple((key_id, epoch) for key_id, epoch in decisions)
            if not all(type(k) is str and type(e) is int for k, e in pairs):
                return None
            usage = tuple(usage)
            if not all(type(u) is str for u in usage):
                return None
            checked.append((event_bytes, node, pairs, usage))
    except (TypeError, ValueError, CanonicalEncodingError):
        return None
    return checked


class AuditCommitter:
    def __init__(self, raft: RaftNode, max_batch: int = 500, timeout: float = 5.0,
                 on_batch: Callable[[int, float], None] = lambda _n, _s: None,
                 on_failure: Callable[[int], None] = lambda _n: None,
                 leader_wait: float = 3.0, forwards_in_flight: int = 2) -> None:
        self.raft = raft
        self.leader_wait = leader_wait
        # Hooks for metrics: (batch size, commit seconds) and (records that failed).
        self.on_batch = on_batch
        self.on_failure = on_failure
        self.max_batch = max_batch
        self.timeout = timeout
        self.metrics = AuditMetrics()
        self._pending: deque[tuple[AuditItem, asyncio.Future[ChainedRecord]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # On the leader: batches followers forwarded, (sender address, token, items).
        self._forwarded: deque[tuple[str, int, list[AuditItem]]] = deque()
        # On a follower: each forwarded record's event bytes -> its future and its batch.
        # Written outside the Raft tick only; the tick only tests membership.
        self._awaiting: dict[bytes, tuple[asyncio.Future[ChainedRecord], _Forward]] = {}
        self._forwards: dict[int, _Forward] = {}
        self._next_token = 0
        # A follower keeps this many forwarded batches on their way at once: its records
        # then wait for about one leader commit, not for the batch ahead of theirs too.
        self.forwards_in_flight = forwards_in_flight
        self._sending: set[asyncio.Task[None]] = set()
        raft.on_peer_message(self._on_peer_message)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop this committer runs on, before any batch: so that, leading, it
        can take batches forwarded by followers before it committed one of its own."""
        self._loop = loop

    async def commit(self, item: AuditItem) -> ChainedRecord:
        (future,) = await self._enqueue((item,))
        return await future

    async def commit_many(self, items: Sequence[AuditItem]
                          ) -> list[ChainedRecord | BaseException]:
        """`commit` for each of `items` (an API worker's records of one loop turn), with one
        wait for them all and no task per record; each result is its record, or what it
        failed with. Raises AuditUnavailable for all of them when no leader is reachable."""
        futures = await self._enqueue(items)
        return await asyncio.gather(*futures, return_exceptions=True)

    async def _enqueue(self, items: Sequence[AuditItem]
                       ) -> list[asyncio.Future[ChainedRecord]]:
        if not self.raft.has_leader:
            await self._wait_for_leader()
        loop = asyncio.get_running_loop()
        self._loop = loop
        futures: list[asyncio.Future[ChainedRecord]] = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        self._start_flusher()
        return futures

    def _start_flusher(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _wait_for_leader(self) -> None:
        # An election is over in about a second: a request on a surviving node waits for
        # it (the audit commit wait) rather than fail. A node cut off from the majority
        # still refuses, after `leader_wait` instead of after the whole commit timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.leader_wait
        while not self.raft.has_leader:
            if loop.time() >= deadline:
                raise AuditUnavailable("no Raft leader is reachable")
            await asyncio.sleep(0.02)

    async def _flush(self) -> None:
        try:
            # Let the requests that are already runnable join the first batch.
            await asyncio.sleep(0)
            while self._pending or self._forwarded:
                if len(self._sending) >= self.forwards_in_flight and not self.raft.is_leader:
                    await asyncio.wait(self._sending, return_when=asyncio.FIRST_COMPLETED)
                    continue
                count = min(len(self._pending), self.max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
                if self.raft.is_leader:
                    forwarded = list(self._forwarded)
                    self._forwarded.clear()
                    await self._commit_batch(batch, forwarded)
                    continue
                self._refuse_forwarded("this node is not the Raft leader")
                if batch:
                    task = asyncio.get_running_loop().create_task(self._send_batch(batch))
                    self._sending.add(task)
                    task.add_done_callback(self._sending.discard)
                    # Let the requests already runnable join the next batch.
                    await asyncio.sleep(0)
        finally:
            self._flusher = None

    async def _send_batch(
            self, batch: list[tuple[AuditItem, asyncio.Future[ChainedRecord]]]) -> None:
        if not await self._forward_batch(batch):
            await self._commit_batch(batch, [])

    async def _commit_batch(
            self, batch: list[tuple[AuditItem, asyncio.Future[ChainedRecord]]],
            forwarded: list[tuple[str, int, list[AuditItem]]]) -> None:
        started = time.perf_counter()
        items = tuple(item for item, _ in batch)
        for _sender, _token, theirs in forwarded:
            items += tuple(theirs)
        command = commands.AppendAudit(items)
        try:
            result = await self.raft.submit(command, self.timeout)
        except RaftUnavailable as exc:
            self._fail_batch(batch, str(exc))
            self._refuse(forwarded, str(exc))
            return
        elapsed = time.perf_counter() - started
        self.metrics.observe(len(items), elapsed * 1000)
        self.on_batch(len(items), elapsed)
        if isinstance(result, Rejected):
            self._fail_batch(batch, result.message)
            self._refuse(forwarded, result.message)
            return
        # The forwarding followers learn of their records when they apply this entry.
        for (_, future), record in zip(batch, result.value, strict=False):
            if not future.done():
                future.set_result(record)

    def _fail_batch(self, batch: list[tuple[AuditItem, asyncio.Future[ChainedRecord]]],
                    reason: str) -> None:
        self.metrics.failures += len(batch)
        if batch:
            self.on_failure(len(batch))
        for _, future in batch:
            if not future.done():
                future.set_exception(AuditUnavailable(reason))

    # -- a follower's side --------------------------------------------------------------

    async def _forward_batch(
            self, batch: list[tuple[AuditItem, asyncio.Future[ChainedRecord]]]) -> bool:
        """Send `batch` to the leader and wait until its records are applied here, or it
        fails. False (nothing sent) when no leader is reachable to send it to."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        token = self._next_token
        self._next_token += 1
        forward = _Forward([item[0] for item, _ in batch], loop.create_future())
        for item, future in batch:
            self._awaiting[item[0]] = (future, forward)
        self._forwards[token] = forward
        leader = self.raft.send_to_leader(
            {"type": FORWARD, "token": token, "items": [item for item, _ in batch]})
        if leader is None:
            self._drop_forward(token)
            return False
        deadline = loop.time() + self.timeout
        while not forward.done.done():
            await asyncio.wait((forward.done,), timeout=_LEADER_CHECK_SECONDS)
            if forward.done.done():
                break
            if loop.time() >= deadline:
                self._fail(forward, "audit commit timed out")
            elif self.raft.leader_address() != leader:
                self._fail(forward, "the Raft leader changed")
        self._forwards.pop(token, None)
        if forward.refused is None:
            elapsed = time.perf_counter() - started
            self.metrics.observe(len(batch), elapsed * 1000)
            self.on_batch(len(batch), elapsed)
        return True

    def _drop_forward(self, token: int) -> _Forward | None:
        forward = self._forwards.pop(token, None)
        if forward is not None:
            for event_bytes in forward.event_bytes:
                self._awaiting.pop(event_bytes, None)
        return forward

    def _fail_forward(self, token: int, reason: str) -> None:
        forward = self._forwards.get(token)
        if forward is not None:
            self._fail(forward, reason)

    def _fail(self, forward: _Forward, reason: str) -> None:
        if forward.done.done():
            return
        forward.refused = reason
        failed = 0
        for event_bytes in forward.event_bytes:
            waiting = self._awaiting.pop(event_bytes, None)
            if waiting is not None and not waiting[0].done():
                waiting[0].set_exception(AuditUnavailable(reason))
                failed += 1
        self.metrics.failures += failed
        if failed:
            self.on_failure(failed)
        forward.done.set_result(None)

    def on_applied(self, command: commands.AppendAudit, result: ApplyResult) -> None:
        """Called in the Raft tick for every applied AppendAudit: settles this node's
        forwarded records that it holds."""
        awaiting = self._awaiting
        if not awaiting or self._loop is None:
            return
        if isinstance(result, Applied):
            found = [(entry[0], record)
                     for entry, record in zip(command.entries, result.value, strict=True)
                     if entry[0] in awaiting]
            if found:
                self._call_soon(self._settle, found)
        else:
            refused = [entry[0] for entry in command.entries if entry[0] in awaiting]
            if refused:
                self._call_soon(self._settle_refused, refused,
                                getattr(result, "message", "refused"))

    def _call_soon(self, callback: Callable[..., None], *args: Any) -> bool:
        """Hand `callback` to the event loop from the Raft tick; False once the loop is
        closed (the node is stopping: nothing is waiting any more)."""
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    def _settle(self, found: list[tuple[bytes, ChainedRecord]]) -> None:
        for event_bytes, record in found:
            waiting = self._awaiting.pop(event_bytes, None)
            if waiting is None:
                continue
            future, forward = waiting
            if not future.done():
                future.set_result(record)
            forward.unsettled -= 1
            if forward.unsettled == 0 and not forward.done.done():
                forward.done.set_result(None)

    def _settle_refused(self, event_bytes: list[bytes], reason: str) -> None:
        forwards = {waiting[1] for e in event_bytes
                    if (waiting := self._awaiting.get(e)) is not None}
        for forward in forwards:
            self._fail(forward, reason)

    # -- the leader's side --------------------------------------------------------------

    def _on_peer_message(self, sender: str, message: dict[str, Any]) -> None:
        """In the Raft tick: a follower's batch, or the leader refusing ours."""
        kind, token = message.get("type"), message.get("token")
        if type(token) is not int:
            return
        if kind == FORWARD:
            items = checked_items(message.get("items"))
            if (items is None or not self.raft.is_leader
                    or not self._call_soon(self._take_forwarded, sender, token, items)):
                self.raft.send_now(sender, {"type": REFUSED, "token": token,
                                            "reason": "not taken by the leader"})
        elif kind == REFUSED:
            reason = message.get("reason")
            self._call_soon(self._fail_forward, token, "the Raft leader refused the audit batch"
                            + (f": {reason[:200]}" if isinstance(reason, str) else ""))

    def _take_forwarded(self, sender: str, token: int, items: list[AuditItem]) -> None:
        if not self.raft.is_leader:
            self._refuse([(sender, token, items)], "this node is not the Raft leader")
            return
        self._forwarded.append((sender, token, items))
        self._start_flusher()

    def _refuse_forwarded(self, reason: str) -> None:
        if self._forwarded:
            forwarded = list(self._forwarded)
            self._forwarded.clear()
            self._refuse(forwarded, reason)

    def _refuse(self, forwarded: list[tuple[str, int, list[AuditItem]]], reason: str) -> None:
        for sender, token, _items in forwarded:
            self.raft.send_to(sender, {"type": REFUSED, "token": token, "reason": reason})
