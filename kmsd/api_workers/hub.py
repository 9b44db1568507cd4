"""The primary's side of API workers: spawns them, keeps their copies of the state equal to
its own, and commits what they ask it to.

One node is one primary process (Raft, the audit segment files, the admin API,
the leader's background jobs) and `[api] workers` API worker processes. All of
them listen on the API port (SO_REUSEPORT: the kernel spreads connections), so
a node uses more than one core; each worker has its own PKCS#11 initialisation
and login (python-pkcs11 sessions must not be shared across processes or
threads: FACTS.md §0.1).

A worker's copy of the state follows the primary's exactly: on connecting it
receives a snapshot taken in a Raft tick, between two applies, and
from then on every entry the primary applies, in log order, as the log holds
it (but audit batches, of which it gets only the key uses). Whenever the
primary installs a snapshot from the leader, the workers are started again
from it.

Reads after writes: a write (any command but an audit batch or a barrier) is
answered, whichever process served it, only after every worker has applied it
(a fence: a round trip on each worker's ordered stream). So once a client has
seen CreateKey or DisableKey succeed, every process of this node sees the
change. Audit batches need no fence: the commit-time re-check at the record's
log position (cluster.state, AppendAudit) already revokes a decision a stale
copy made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import select
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import structlog

from cluster import commands
from cluster.raft_node import RaftNode, RaftUnavailable
from cluster.state import Applied, ApplyResult, KmsState, audit_usage
from kmsd.api_workers import wire
from kmsd.audit.chain import ChainedRecord
from kmsd.audit.committer import AuditCommitter, AuditItem, AuditUnavailable

log = structlog.get_logger("kmsd.api_workers")

# A worker that has not answered a fence in this long is stuck: it is replaced.
FENCE_TIMEOUT_SECONDS = 2.0
RESPAWN_DELAY_SECONDS = 1.0
STATUS_INTERVAL_SECONDS = 0.1


class _WorkerLink:
    """One worker process and the primary's end of its socketpair."""

    def __init__(self, index: int, process: asyncio.subprocess.Process | None,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.process = process
        self.reader = reader
        self.writer = writer
        self.fences: dict[int, asyncio.Future[None]] = {}
        self.closed = False
        # Serving (or about to): writes are fenced with it from then on.
        self.serving = False
        self.counts: dict[str, int] = {}

        # While a forked child writes this worker's snapshot into the socket, frames wait
        # here (set in a tick before anything is sent to it; see _subscribe).
        self.holding = False
        self.held: list[bytes] = []
        socket_ = writer.get_extra_info("socket")
        self.fd: int = socket_.fileno() if socket_ is not None else -1

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.holding:
            self.held.append(data)
        else:
            self.writer.write(data)

    def release(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for data in held:
            self.send(data)

    def close(self) -> None:
        self.closed = True
        for future in self.fences.values():
            if not future.done():
                future.set_result(None)  # a dead worker serves nothing stale
        self.fences.clear()
        self.writer.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


class WorkerHub:
    def __init__(self, count: int, worker_command: list[str], raft: RaftNode,
                 state: KmsState, audit: AuditCommitter,
                 status: Callable[[], dict[str, Any]],
                 render_metrics: Callable[[], Awaitable[bytes]],
                 readiness: Callable[[], tuple[int, dict[str, Any]]],
                 merge_observed: Callable[[Any], None]) -> None:
        self.count = count
        # argv of a worker, to which `--fd N --index I` is added.
        self.worker_command = worker_command
        self.raft = raft
        self.state = state
        self.audit = audit
        self.status = status
        self.render_metrics = render_metrics
        self.readiness = readiness
        # Adds a worker's OBSERVED body (RequestTallies.take_wire) to the node's metrics.
        self.merge_observed = merge_observed
        # Read in the tick, replaced (never mutated) outside it.
        self._subscribers: tuple[_WorkerLink, ...] = ()
        self._links: dict[int, _WorkerLink] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._fence_ids = 0
        self._stopping = False
        self._last_status: bytes = b""
        self.fence_timeout = FENCE_TIMEOUT_SECONDS

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.raft.follow(self._on_packed, self._on_restored)
        for index in range(self.count):
            self._spawn_soon(index, 0.0)
        self._keep(self._push_status_forever())

    async def stop(self) -> None:
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        for link in list(self._links.values()):
            if link.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    link.process.terminate()
        for link in list(self._links.values()):
            if link.process is not None:
                try:
                    await asyncio.wait_for(link.process.wait(), 5.0)
                except TimeoutError:
                    link.kill()
                    await link.process.wait()
            link.close()
        self._links.clear()
        self._subscribers = ()

    def reported(self, name: str) -> int:
        """The sum over the workers of one of their reported counts (wire.COUNTS)."""
        return sum(link.counts.get(name, 0) for link in self._links.values())

    @property
    def pids(self) -> list[int]:
        return [pid for link in self._links.values() if (pid := link.pid) is not None]

    def _keep(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _spawn_soon(self, index: int, delay: float) -> None:
        self._keep(self._spawn(index, delay))

    async def _spawn(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.worker_command, "--fd", str(theirs.fileno()), "--index", str(index),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            log.error("api_worker_spawn_failed", index=index, error=str(exc))
            self._spawn_soon(index, RESPAWN_DELAY_SECONDS)
            return
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=2**20)
        self.attach(index, reader, writer, process)
        log.info("api_worker_started", index=index, pid=process.pid)

    def attach(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               process: asyncio.subprocess.Process | None = None) -> None:
        """Feed the state to the worker at the other end of (reader, writer) and serve its
        calls; when it goes away, a process of ours is spawned again."""
        link = _WorkerLink(index, process, reader, writer)
        self._links[index] = link
        self._subscribe(link)
        self._keep(self._serve(link))

    def _subscribe(self, link: _WorkerLink) -> None:
        loop = self._loop
        assert loop is not None

        def on_tick() -> None:
            # Between two applies, so the snapshot and the subscription see the same state.
            # Encoding the state takes seconds at 100k keys, and no entry would commit
            # meanwhile: a forked child encodes it from a copy-on-write image and writes it
            # into the socket (nothing else has been sent on it yet), as pysyncobj's own
            # snapshots do. The child touches no PKCS#11 session and leaves with os._exit.
            link.holding = True
            self._subscribers = (*self._subscribers, link)
            pid = _fork_snapshot_writer(self.state, link.fd)
            loop.call_soon_threadsafe(self._keep, self._welcome(link, pid))

        self.raft.call_on_tick(on_tick)

    async def _welcome(self, link: _WorkerLink, pid: int) -> None:
        assert self._loop is not None
        code = await self._loop.run_in_executor(None, _exit_code, pid)
        if code != 0:
            log.error("api_worker_snapshot_failed", index=link.index, code=code)
            self._drop(link)
            return
        link.release()
        link.send(wire.frame(wire.STATUS, self._status_body()))

    async def _serve(self, link: _WorkerLink) -> None:
        """Read what the worker sends until it exits; then replace it."""
        try:
            while True:
                kind, body = await wire.read_frame(link.reader)
                if kind == wire.CALL:
                    call_id, name, args = msgpack.unpackb(body)
                    self._keep(self._answer(link, call_id, name, args))
                elif kind == wire.READY:
                    link.serving = True
                    link.send(wire.frame(wire.SERVE, b""))
                elif kind == wire.FENCED:
                    future = link.fences.pop(msgpack.unpackb(body), None)
                    if future is not None and not future.done():
                        future.set_result(None)
                elif kind == wire.OBSERVED:
                    self.merge_observed(msgpack.unpackb(body))
                elif kind == wire.COUNTS:
                    link.counts = {str(k): int(v) for k, v in msgpack.unpackb(body).items()}
                else:
                    raise wire.FrameError(f"unknown frame kind {kind!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (wire.FrameError, ValueError, TypeError, IndexError,
                msgpack.UnpackException) as exc:
            log.error("api_worker_protocol_error", index=link.index, error=str(exc))
        self._drop(link)
        code = await link.process.wait() if link.process is not None else None
        if self._links.get(link.index) is link:
            del self._links[link.index]
        if not self._stopping and link.process is not None:
            log.warning("api_worker_exited", index=link.index, code=code)
            self._spawn_soon(link.index, RESPAWN_DELAY_SECONDS)

    # -- the state feed (in the tick) --------------------------------------------

    def _on_packed(self, packed: bytes, command: commands.Command,
                   result: ApplyResult) -> None:
        subscribers = self._subscribers
        if not subscribers or self._loop is None:
            return
        if isinstance(command, commands.AppendAudit):
            if not isinstance(result, Applied):
                return  # refused: nothing changed
            usage = audit_usage(command, result.value)
            if not usage:
                return
            data = wire.frame(wire.USAGE, msgpack.packb(usage))
        else:
            data = wire.frame(wire.APPLY, packed)
        self._loop.call_soon_threadsafe(self._publish, subscribers, data)

    def _on_restored(self) -> None:
        """A snapshot from the leader replaced the state (this node was far behind): the
        workers start again from it. They leave the feed here, in the tick, before
        any entry after the snapshot applies."""
        subscribers, self._subscribers = self._subscribers, ()
        if subscribers and self._loop is not None:
            self._loop.call_soon_threadsafe(self._replace, subscribers)

    def _replace(self, links: tuple[_WorkerLink, ...]) -> None:
        for link in links:
            self._drop(link)

    def _drop(self, link: _WorkerLink) -> None:
        """Out of the feed, its end closed, its process killed (_serve spawns it again)."""
        self._subscribers = tuple(s for s in self._subscribers if s is not link)
        link.close()
        link.kill()

    @staticmethod
    def _publish(subscribers: tuple[_WorkerLink, ...], data: bytes) -> None:
        for link in subscribers:
            link.send(data)

    # -- status -------------------------------------------------------------------

    def _status_body(self) -> bytes:
        return msgpack.packb(self.status())

    async def _push_status_forever(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_SECONDS)
            body = self._status_body()
            if body != self._last_status:
                self._last_status = body
                self._publish(self._subscribers, wire.frame(wire.STATUS, body))

    # -- fences -------------------------------------------------------------------

    async def fence(self) -> None:
        """Return once every live worker has applied everything this process has applied."""
        links = [link for link in self._subscribers if link.serving and not link.closed]
        if not links:
            return
        waits = [(link, self._send_fence(link)) for link in links]
        for link, future in waits:
            try:
                await asyncio.wait_for(asyncio.shield(future), self.fence_timeout)
            except TimeoutError:
                # It cannot be trusted to serve what this write changed: replace it.
                log.error("api_worker_stuck", index=link.index, pid=link.pid)
                self._drop(link)

    async def gather_observed(self, timeout: float = FENCE_TIMEOUT_SECONDS) -> None:
        """Return once every serving worker has sent what it observed so far and its HSM
        handle counts (it reports before it answers a fence), or after `timeout`: a slow
        worker's part then comes with its next report. Unlike `fence`, a late answer costs
        the worker nothing. Scrapes and status reads call it first."""
        futures = [self._send_fence(link) for link in self._subscribers
                   if link.serving and not link.closed]
        if futures:
            await asyncio.wait(futures, timeout=timeout)

    def _send_fence(self, link: _WorkerLink) -> asyncio.Future[None]:
        assert self._loop is not None
        self._fence_ids += 1
        future: asyncio.Future[None] = self._loop.create_future()
        link.fences[self._fence_ids] = future
        link.send(wire.frame(wire.FENCE, msgpack.packb(self._fence_ids)))
        return future

    # -- calls --------------------------------------------------------------------

    async def _answer(self, link: _WorkerLink, call_id: int, name: str, args: Any) -> None:
        try:
            value = await self._call(name, args)
            reply = (call_id, True, value)
        except RaftUnavailable as exc:
            reply = (call_id, False, ("RaftUnavailable", str(exc)))
        except Exception as exc:  # reported to the worker, which answers KMSInternalException
            log.error("api_worker_call_failed", call=name, exc_type=type(exc).__name__,
                      exc_info=True)
            reply = (call_id, False, ("Internal", type(exc).__name__))
        link.send(wire.frame(wire.REPLY, pickle.dumps(reply, pickle.HIGHEST_PROTOCOL)))

    async def _call(self, name: str, args: Any) -> Any:
        if name == "audit":
            items = [_audit_item(item) for item in args]
            try:
                results = await self.audit.commit_many(items)
            except AuditUnavailable as exc:
                return [("AuditUnavailable", str(exc))] * len(items)
            return [wire.committed_record(r) if isinstance(r, ChainedRecord)
                    else ("AuditUnavailable", str(r)) if isinstance(r, AuditUnavailable)
                    else ("Internal", type(r).__name__) for r in results]
        if name == "submit":
            packed, timeout = args
            return await self.submit(commands.decode(packed), timeout)
        if name == "metrics":
            return await self.render_metrics()
        if name == "readyz":
            return self.readiness()
        raise ValueError(f"unknown call {name!r}")

    async def submit(self, command: commands.Command,
                     timeout: float | None = None) -> ApplyResult:
        """Commit a command; a write returns once every worker has applied it."""
        result = await self.raft.submit(command, timeout)
        if not isinstance(command, (commands.AppendAudit, commands.Barrier)):
            await self.fence()
        return result


def _fork_snapshot_writer(state: KmsState, fd: int) -> int:
    """Fork a child that writes `state`'s SNAPSHOT frame to `fd` and exits; its pid."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        data = memoryview(wire.frame(wire.SNAPSHOT, state.to_snapshot()))
        while data:
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:  # the socket is non-blocking (asyncio's)
                select.select([], [fd], [])
        code = 0
    finally:
        os._exit(code)


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _audit_item(raw: list[Any]) -> AuditItem:
    event_bytes, node, decisions, usage = raw
    if not isinstance(event_bytes, bytes) or not isinstance(node, str):
        raise ValueError("not an audit item")
    return (event_bytes, node, tuple((str(k), int(e)) for k, e in decisions),
            tuple(usage))


class FencedRaft:
    """The primary's Raft node as its service layer sees it once workers run: writes are
    answered only after every worker applied them (see the module docstring)."""

    def __init__(self, raft: RaftNode, hub: WorkerHub) -> None:
        self._raft = raft
        self._hub = hub

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raft, name)

    async def submit(self, command: commands.Command,
                     timeout: float | None = None) -> ApplyResult:
        return await self._hub.submit(command, timeout)

    async def barrier(self, timeout: float | None = None) -> None:
        await self._raft.barrier(timeout)


def worker_command(config_path: str) -> list[str]:
    return [sys.executable, "-m", "kmsd.cli", "api-worker",
            "--config", os.path.abspath(config_path)]
