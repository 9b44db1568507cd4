"""An API worker process: serves the KMS API on the node's port from a copy of the state.

It has what a request needs and nothing else: its own PKCS#11 login to the
node's token (and its own helper process for slow asymmetric calls), a copy of
the replicated state fed by the primary (kmsd.api_workers.hub), and the same
protocol and service code as the primary. What must go through Raft -- audit
records, the rare write, a catch-up barrier -- it asks the primary to commit.
It exits when the primary goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
from collections.abc import Callable
from typing import Any

import msgpack
import structlog
from aiohttp import web

from cluster import commands
from cluster.raft_node import RaftUnavailable
from cluster.state import ApplyResult, KmsState
from kmsd import gc_pauses
from kmsd.api.api_app import make_api_server
from kmsd.api.protocol import KmsProtocol
from kmsd.api.validation import RequestValidator
from kmsd.api_workers import wire
from kmsd.audit.chain import ChainedRecord
from kmsd.audit.committer import AuditItem, AuditUnavailable
from kmsd.clock import Clock
from kmsd.config import NodeConfig
from kmsd.hsm.partition import HsmError
from kmsd.metric_tally import RequestTallies
from kmsd.metrics import HSM_BUCKETS, LATENCY_BUCKETS
from kmsd.serving import serving_parts, tls_server_context

log = structlog.get_logger("kmsd.api_worker")

# How often the requests and HSM calls observed, and the HSM handle cache's counts (when they
# changed), are reported to the primary when no fence asks first.
REPORT_INTERVAL_SECONDS = 0.5


class PrimaryLink:
    """This worker's end of the socketpair: applies the state feed in order, and turns calls
    into awaitable replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 state: KmsState, on_applied: Callable[[commands.Command, ApplyResult], None]
                 ) -> None:
        self.reader = reader
        self.writer = writer
        self.state = state
        self.on_applied = on_applied
        self.status: dict[str, Any] = {"not_ready": "The worker is starting.",
                                       "has_leader": False}
        self.synced = asyncio.Event()
        self.may_serve = asyncio.Event()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = 0
        self.tallies = RequestTallies(LATENCY_BUCKETS, HSM_BUCKETS)
        # The worker's HSM handle-cache counts, reported when they change.
        self.counts: Callable[[], dict[str, int]] = dict
        self._sent_counts: dict[str, int] = {}

    async def run(self) -> None:
        """Read the primary's frames until it goes away."""
        try:
            while True:
                kind, body = await wire.read_frame(self.reader)
                self._handle(kind, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(RaftUnavailable("the node's primary process is gone"))

    def _handle(self, kind: bytes, body: bytes) -> None:
        if kind == wire.USAGE:
            self.state.note_key_usage(msgpack.unpackb(body))
        elif kind == wire.APPLY:
            command = commands.decode(body)
            self.on_applied(command, self.state.apply(command))
        elif kind == wire.REPLY:
            call_id, ok, value = pickle.loads(body)  # from the process that spawned us
            future = self._calls.pop(call_id, None)
            if future is not None and not future.done():
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(_call_error(value))
        elif kind == wire.FENCE:
            # What this worker observed and its counts go ahead of its answer: a scrape or
            # status read that fences the workers first counts every request they answered
            # before it.
            self._report()
            self.writer.write(wire.frame(wire.FENCED, body))
        elif kind == wire.STATUS:
            self.status = msgpack.unpackb(body)
        elif kind == wire.SNAPSHOT:
            self.state.restore_snapshot(body)
            self.synced.set()
        elif kind == wire.SERVE:
            self.may_serve.set()
        else:
            raise wire.FrameError(f"unknown frame kind {kind!r}")

    async def call(self, name: str, args: Any, timeout: float) -> Any:
        self._call_ids += 1
        call_id = self._call_ids
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        self.writer.write(wire.frame(wire.CALL, msgpack.packb([call_id, name, args])))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RaftUnavailable(f"{name} timed out") from None
        finally:
            self._calls.pop(call_id, None)

    def observe(self, operation: str, outcome: str, seconds: float) -> None:
        """An answered request (for the node's metrics, sent with the next report)."""
        self.tallies.observe_request(operation, outcome, seconds)

    def observe_hsm(self, call: str, seconds: float, failed: bool) -> None:
        self.tallies.observe_hsm(call, seconds, failed)

    def _report(self) -> None:
        observed = self.tallies.take_wire()
        if observed is not None:
            self.writer.write(wire.frame(wire.OBSERVED, msgpack.packb(observed)))
        current = self.counts()
        if current != self._sent_counts:
            self.writer.write(wire.frame(wire.COUNTS, msgpack.packb(current)))
            self._sent_counts = current

    async def report_forever(self) -> None:
        """Report every REPORT_INTERVAL_SECONDS, requests or none: handle counts also change
        with no request (a deleted key's handles are dropped)."""
        while True:
            self._report()
            await asyncio.sleep(REPORT_INTERVAL_SECONDS)


def _call_error(value: Any) -> Exception:
    kind, message = value
    if kind == "RaftUnavailable":
        return RaftUnavailable(message)
    return RuntimeError(f"the primary failed the call: {message}")


class RemoteRaft:
    """What the service layer needs of a Raft node, through the primary."""

    # Generous: the primary's own commit timeout runs inside it.
    CALL_TIMEOUT_SECONDS = 30.0

    def __init__(self, link: PrimaryLink) -> None:
        self.link = link

    @property
    def has_leader(self) -> bool:
        return bool(self.link.status.get("has_leader"))

    @property
    def is_leader(self) -> bool:
        return False  # leader-only jobs run in the primary

    async def submit(self, command: commands.Command,
                     timeout: float | None = None) -> ApplyResult:
        # The reply follows the applied entry on the same stream: once it is here, this
        # copy of the state has applied the command too.
        result: ApplyResult = await self.link.call(
            "submit", [commands.encode(command), timeout], self.CALL_TIMEOUT_SECONDS)
        return result

    async def barrier(self, timeout: float | None = None) -> None:
        await self.submit(commands.Barrier(), timeout)


class RemoteAuditCommitter:
    """Fail-closed audit through the primary: the records a turn of the event loop produced
    go in one call, and the primary's committer groups them with everyone else's."""

    def __init__(self, link: PrimaryLink, timeout: float = 30.0) -> None:
        self.link = link
        self.timeout = timeout
        self._pending: list[tuple[AuditItem, asyncio.Future[ChainedRecord]]] = []
        self._scheduled = False
        # The loop keeps only weak references to tasks.
        self._in_flight: set[asyncio.Task[None]] = set()

    async def commit(self, item: AuditItem) -> ChainedRecord:
        future: asyncio.Future[ChainedRecord] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[tuple[AuditItem, asyncio.Future[ChainedRecord]]]) -> None:
        try:
            results = await self.link.call("audit", [list(item) for item, _ in batch],
                                           self.timeout)
        except (RaftUnavailable, RuntimeError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(AuditUnavailable(str(exc)))
            return
        for (item, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            record = wire.record_from_reply(result, item)
            if record is not None:
                future.set_result(record)
            else:
                future.set_exception(AuditUnavailable(str(result[1])))


class ApiWorker:
    def __init__(self, config: NodeConfig, index: int, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, clock: Clock | None = None) -> None:
        self.config = config
        self.index = index
        self.state = KmsState()
        self.link = PrimaryLink(reader, writer, self.state, self._on_applied)
        self.parts = serving_parts(config, self.state,
                                   RemoteRaft(self.link), clock)  # type: ignore[arg-type]
        self.parts.hsm.observe = self.link.observe_hsm
        self.link.counts = self._counts
        self.protocol = KmsProtocol(self.parts.core, self.parts.authenticator,
                                    RequestValidator(), self._not_ready,
                                    RemoteAuditCommitter(self.link),  # type: ignore[arg-type]
                                    config.node_id, self.link.observe)
        self._runner: web.ServerRunner | None = None

    def _on_applied(self, command: commands.Command, result: ApplyResult) -> None:
        self.parts.effects.applied(command, result)

    def _counts(self) -> dict[str, int]:
        return {"cached_handles": self.parts.cached_handles(),
                "cache_hits": self.parts.hsm.handle_cache_hits,
                "cache_misses": self.parts.hsm.handle_cache_misses}

    def _not_ready(self) -> str | None:
        reason = self.link.status.get("not_ready")
        return str(reason) if reason is not None else None

    def api_server(self) -> web.Server:
        async def readiness() -> tuple[int, dict[str, Any]]:
            # The node's readiness is the primary's (Raft, domain key, lag).
            try:
                status, body = await self.link.call("readyz", None, 5.0)
            except (RaftUnavailable, RuntimeError):
                return 503, {"ready": False, "lag": None,
                             "reason": "The node's primary process does not answer."}
            return int(status), dict(body)

        async def render_metrics() -> bytes | None:
            try:
                return bytes(await self.link.call("metrics", None, 5.0))
            except (RaftUnavailable, RuntimeError):
                return None

        return make_api_server(self.protocol.handle, readiness, render_metrics)

    async def run(self) -> None:
        """Serve until SIGTERM or until the primary goes away."""
        loop = asyncio.get_running_loop()
        self.parts.effects.loop = loop
        feed = asyncio.create_task(self.link.run())
        reporter = asyncio.create_task(self.link.report_forever())
        try:
            if not await self._first_of(feed, self.link.synced):
                return  # the primary went away before we had a state
            self.parts.asymmetric.start()
            # Writes the primary answers from now on wait for this copy; the ones answered
            # before are all applied once SERVE is read (kmsd.api_workers.wire).
            self.link.writer.write(wire.frame(wire.READY, b""))
            if not await self._first_of(feed, self.link.may_serve):
                return
            # Before listening: from then on requests come, and their garbage must not freeze.
            gc_pauses.freeze_heap()
            self._runner = web.ServerRunner(self.api_server())
            await self._runner.setup()
            host, _, port = self.config.api_listen.rpartition(":")
            # Listen only once the copy of the state is here: the kernel hands this socket
            # connections as soon as it listens.
            await web.TCPSite(self._runner, host, int(port),
                              ssl_context=tls_server_context(self.config),
                              reuse_port=True).start()
            log.info("api_worker_serving", index=self.index, pid=os.getpid())
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await self._first_of(feed, stop)
        finally:
            reporter.cancel()
            feed.cancel()
            await self.stop()

    @staticmethod
    async def _first_of(feed: asyncio.Task[None], event: asyncio.Event) -> bool:
        """Wait for `event` or the end of the feed; True if the event came first."""
        waiter = asyncio.create_task(event.wait())
        await asyncio.wait({feed, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        return event.is_set()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(HsmError):
            await self.parts.asymmetric.stop()
        self.parts.core.key_stores.close_all()
        self.parts.hsm.close()


async def serve_worker(config: NodeConfig, fd: int, index: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2**20)
    worker = ApiWorker(config, index, reader, writer)
    await worker.run()
