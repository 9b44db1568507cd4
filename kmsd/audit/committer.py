"""Group commit of audit records through Raft: fail-closed, one batch in flight.

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

Never holds plaintext: the entries are canonical CloudTrail-shaped events,
already stripped of every secret member by kmsd.audit.record.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster import commands
from cluster.raft_node import RaftNode, RaftUnavailable
from cluster.state import Rejected
from kmsd.audit.chain import ChainedRecord

AuditItem = tuple[bytes, str, tuple[tuple[str, int], ...], tuple[str, ...]]


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


class AuditCommitter:
    def __init__(self, raft: RaftNode, max_batch: int = 500, timeout: float = 5.0,
                 on_batch: Callable[[int, float], None] = lambda _n, _s: None,
                 on_failure: Callable[[int], None] = lambda _n: None,
                 leader_wait: float = 3.0) -> None:
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

    async def commit(self, item: AuditItem) -> ChainedRecord:
        if not self.raft.has_leader:
            await self._wait_for_leader()
        future: asyncio.Future[ChainedRecord] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        return await future

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
            while self._pending:
                count = min(len(self._pending), self.max_batch)
                batch = [self._pending.popleft() for _ in range(count)]
                await self._commit_batch(batch)
        finally:
            self._flusher = None

    async def _commit_batch(
            self, batch: list[tuple[AuditItem, asyncio.Future[ChainedRecord]]]) -> None:
        started = time.perf_counter()
        command = commands.AppendAudit(tuple(item for item, _ in batch))
        try:
            result = await self.raft.submit(command, self.timeout)
        except RaftUnavailable as exc:
            self.metrics.failures += len(batch)
            self.on_failure(len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(AuditUnavailable(str(exc)))
            return
        elapsed = time.perf_counter() - started
        self.metrics.observe(len(batch), elapsed * 1000)
        self.on_batch(len(batch), elapsed)
        if isinstance(result, Rejected):
            for _, future in batch:
                if not future.done():
                    future.set_exception(AuditUnavailable(result.message))
            return
        for (_, future), record in zip(batch, result.value, strict=True):
            if not future.done():
                future.set_result(record)
