"""pysyncobj behind a small asyncio interface: submit a command, await its result.

pysyncobj's ticks run on the event loop that starts the node
(cluster/loop_tick.py): its sockets are the loop's, and a tick follows every
socket event and runs at least every 50 ms. Replicated methods, their
callbacks and pysyncobj's tick callbacks therefore all run on the loop thread.
`RaftNode.submit` turns a replicated call into an awaitable, with a timeout on
every call (pysyncobj has none for asynchronous calls and queues commands
indefinitely while there is no leader).

Configuration choices and why (see FACTS.md §0, §B):
- `password` is always set: the Raft port speaks pickle, and without it any
  peer that reaches the port can read the state, add a member or run code.
  Messages are protected with AES-GCM under a key derived from it, uncompressed,
  instead of pysyncobj's zlib + Fernet (cluster/raft_wire.py: 1-5 µs per
  message instead of 30-70; every node of a cluster must run the same wire).
- `appendEntriesUseBatch=False`: otherwise every synchronous commit waits one
  `appendEntriesPeriod` (~100 ms). The leader then also sends a heartbeat
  carrying the new commit index right after each commit, so followers apply at
  once. Holding it back a few ms for the next entry to carry instead removed
  those 4 messages per batch but no measurable CPU (bench/raft_batch_cost.py,
  1-10 ms tried), while delaying commits served by followers: not done.
- replicated state lives in a `SyncObjConsumer` built before `SyncObj`, so a
  restored snapshot is never overwritten by late initialisation.
- `leaderFallbackTimeout` lowered from 30 s so a partitioned leader steps down
  within seconds.
- `useFork=True` with a lazy snapshot: at log compaction pysyncobj forks, and
  the state's msgpack form is built, pickled and gzipped in the child, from a
  copy-on-write image of the state as applied. In the tick that took 12.9 s
  at 66k keys, and no entry committed meanwhile. The child touches no
  PKCS#11 session (never used after fork, as Cryptoki requires) and leaves with
  `os._exit`, so no atexit handler or C_Finalize runs there.
- the journal is `cluster.journal.ScrubbingFileJournal`: entries dropped by
  compaction are zeroed on disk, so a deleted key's wrapped material leaves
  the journal once the log is compacted.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pysyncobj import (
    FAIL_REASON,
    SyncObj,
    SyncObjConf,
    SyncObjConsumer,
    SyncObjException,
    replicated,
)

from cluster import commands, journal, loop_tick, raft_wire
from cluster.state import ApplyResult, KmsState
from cluster.syncobj_guard import PEER_MESSAGE_PREFIX, GuardedSyncObj

AppliedListener = Callable[[commands.Command, ApplyResult], None]
PackedListener = Callable[[bytes, commands.Command, ApplyResult], None]
PeerMessageHandler = Callable[[str, dict[str, Any]], None]

# pysyncobj's autoTickPeriod: the longest a tick waits when no socket event comes.
_TICK_PERIOD = 0.05

_FAIL_NAMES = {value: name for name, value in vars(FAIL_REASON).items() if name.isupper()}


class RaftUnavailable(Exception):
    """The command was not committed (no leader, no quorum, timeout); it may be retried."""


class _SnapshotWhenPickled:
    """Stands for the state's snapshot bytes in pysyncobj's dump: pickles as those bytes,
    computed only when pickled, so a dump loads back as plain bytes."""

    def __init__(self, state: KmsState) -> None:
        self._state = state

    def __reduce__(self) -> tuple[type[bytes], tuple[bytes]]:
        return bytes, (self._state.to_snapshot(),)


class _ReplicatedKmsState(SyncObjConsumer):
    def __init__(self, state: KmsState, listener: AppliedListener) -> None:
        super().__init__()
        self._kms_state = state
        self._listener = listener
        # Copies of the state outside this process (API workers) follow these two, in the
        # tick: each applied entry as logged, and every snapshot installed.
        self.packed_listener: PackedListener | None = None
        self.restored_listener: Callable[[], None] | None = None

    @replicated
    def apply_command(self, packed: bytes) -> ApplyResult | None:
        try:
            command = commands.decode(packed)
        except commands.CommandDecodeError:
            # Every replica refuses the same entry the same way.
            return None
        result = self._kms_state.apply(command)
        self._listener(command, result)
        if self.packed_listener is not None:
            self.packed_listener(packed, command, result)
        return result

    def _serialize(self) -> _SnapshotWhenPickled:
        # Called in the tick; the pickling (and so to_snapshot) happens in the child
        # pysyncobj forks for the dump.
        return _SnapshotWhenPickled(self._kms_state)

    def _deserialize(self, data: bytes) -> None:
        self._kms_state.restore_snapshot(data)
        if self.restored_listener is not None:
            self.restored_listener()


@dataclass(frozen=True)
class RaftSettings:
    self_address: str
    peer_addresses: tuple[str, ...]
    data_dir: str
    password: str
    leader_fallback_timeout: float = 3.0
    commit_timeout: float = 5.0
    # Audit batches make entries large: compact often so the journal stays small.
    compaction_min_entries: int = 2000
    compaction_min_seconds: float = 60.0


class RaftNode:
    def __init__(self, settings: RaftSettings, state: KmsState,
                 listener: AppliedListener | None = None) -> None:
        self.settings = settings
        self.state = state
        self._consumer = _ReplicatedKmsState(state, listener or (lambda _c, _r: None))
        self._syncobj: SyncObj | None = None
        self._status_lock = threading.Lock()
        # Calls that touch pysyncobj internals run in its tick, queued here (any thread).
        self._tick_jobs: deque[Callable[[], None]] = deque()
        self._peer_handler: PeerMessageHandler | None = None
        self._ticker: loop_tick.LoopTicker | None = None
        self._poller: loop_tick.LoopPoller | None = None

    def start(self) -> None:
        """Start the Raft member; called on the event loop that will run its ticks."""
        loop = asyncio.get_running_loop()
        os.makedirs(self.settings.data_dir, exist_ok=True)
        journal.install()
        raft_wire.install()
        loop_tick.install()
        self._ticker = loop_tick.LoopTicker(loop, self._tick, _TICK_PERIOD)
        self._poller = loop_tick.LoopPoller(loop, self._ticker.request)
        conf = SyncObjConf(
            password=self.settings.password,
            journalFile=os.path.join(self.settings.data_dir, "raft.journal"),
            fullDumpFile=os.path.join(self.settings.data_dir, "raft.snapshot"),
            appendEntriesUseBatch=False,
            leaderFallbackTimeout=self.settings.leader_fallback_timeout,
            dynamicMembershipChange=True,
            useFork=True,
            logCompactionMinEntries=self.settings.compaction_min_entries,
            logCompactionMinTime=self.settings.compaction_min_seconds,
            autoTick=False,
            pollerType=self._poller,
            # Without a tick thread pysyncobj binds in its constructor, retrying at once
            # for as many attempts as this allows (0: forever, on the loop's thread).
            maxBindRetries=1,
        )
        try:
            self._syncobj = GuardedSyncObj(
                self.settings.self_address, list(self.settings.peer_addresses),
                conf=conf, consumers=[self._consumer],
                encryptor=raft_wire.AeadEncryptor(self.settings.password))
        except SyncObjException as exc:
            self._poller.close()
            raise OSError(f"cannot listen for Raft on {self.settings.self_address}") from exc
        self._syncobj.addOnTickCallback(self._run_tick_jobs)
        self._syncobj.peer_message_handler = self._peer_message
        log = self._syncobj._SyncObj__raftLog
        if isinstance(log, journal.ScrubbingFileJournal):
            syncobj = self._syncobj
            log.current_term = lambda: syncobj.raftCurrentTerm
        self._ticker.start()
        self._ticker.request()

    def _tick(self) -> None:
        if self._syncobj is not None:
            self._syncobj.doTick(0.0)

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._syncobj is not None:
            self._syncobj.destroy()
            self._syncobj = None
        if self._poller is not None:
            self._poller.close()

    def _run_tick_jobs(self) -> None:
        while self._tick_jobs:
            self._tick_jobs.popleft()()

    def call_on_tick(self, job: Callable[[], None]) -> None:
        """Run `job` at the end of the next tick: no entry is applied meanwhile."""
        self._tick_jobs.append(job)

    def on_peer_message(self, handler: PeerMessageHandler) -> None:
        """Hear the messages other nodes send with `send_to_leader`/`send_to`, in the tick:
        handler(sender address, message)."""
        self._peer_handler = handler

    def _peer_message(self, node: Any, message: dict[str, Any]) -> None:
        if self._peer_handler is not None:
            self._peer_handler(str(node.address), message)

    def leader_address(self) -> str | None:
        """The address of the leader this node knows of, if it is itself or connected."""
        leader = self._reachable_leader()
        return None if leader is None else str(leader.address)

    def send_to_leader(self, message: dict[str, Any]) -> str | None:
        """Send `message` (a dict whose "type" starts with "kmsd_") to the current leader
        over the Raft connection, from the next tick; the leader's address, or None when
        no leader is reachable (nothing is sent). Delivery is not confirmed: a sender that
        needs an answer waits for one, with a timeout."""
        address = self.leader_address()
        if address is None or self._syncobj is None:
            return None
        if address == str(self._syncobj.selfNode.address):
            return None
        self._send_on_tick(address, message)
        return address

    def send_to(self, address: str, message: dict[str, Any]) -> None:
        """Send `message` to the member at `address`, from the next tick (any thread may
        call this)."""
        self._send_on_tick(address, message)

    def send_now(self, address: str, message: dict[str, Any]) -> None:
        """`send_to` for a caller already in the tick (a peer message handler)."""
        syncobj = self._syncobj
        if syncobj is None:
            return
        for node in syncobj.otherNodes:
            if str(node.address) == address:
                syncobj._SyncObj__transport.send(node, message)
                return

    def _send_on_tick(self, address: str, message: dict[str, Any]) -> None:
        if not message.get("type", "").startswith(PEER_MESSAGE_PREFIX):
            raise ValueError("a peer message type starts with " + PEER_MESSAGE_PREFIX)
        self.call_on_tick(lambda: self.send_now(address, message))
        self._wake_tick()

    def _wake_tick(self) -> None:
        # Queued work should not wait for the next socket event or the tick period; the
        # notifier's pipe is one of the loop's readers, so this works from any thread.
        notifier = getattr(self._syncobj, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()

    def follow(self, on_packed: PackedListener, on_restored: Callable[[], None]) -> None:
        """Hear every applied entry (as logged) and every installed snapshot, in the tick:
        what a copy of the state elsewhere needs to stay equal to this one."""
        self._consumer.packed_listener = on_packed
        self._consumer.restored_listener = on_restored

    async def _call(self, invoke: Callable[[Callable[[Any, int], None]], None],
                    timeout: float | None, what: str, needs_result: bool) -> Any:
        """Run a pysyncobj call that reports through a callback in a tick, and await that
        report, with a timeout (pysyncobj has none)."""
        if self._syncobj is None:
            raise RaftUnavailable("raft node is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def resolve(result: Any, error: int) -> None:  # in a tick, on this loop's thread
            if future.done():  # timed out and cancelled meanwhile
                return
            if error != FAIL_REASON.SUCCESS:
                future.set_exception(RaftUnavailable(_FAIL_NAMES.get(error, str(error))))
            elif needs_result and result is None:
                future.set_exception(RaftUnavailable("command refused by every replica"))
            else:
                future.set_result(result)

        invoke(resolve)
        try:
            return await asyncio.wait_for(future, timeout or self.settings.commit_timeout)
        except TimeoutError as exc:
            raise RaftUnavailable(f"{what} timed out") from exc

    async def submit(self, command: commands.Command,
                     timeout: float | None = None) -> ApplyResult:
        """Commit `command` through Raft and return its result as applied on this node."""
        packed = commands.encode(command)
        return await self._call(
            lambda resolve: self._consumer.apply_command(packed, callback=resolve),
            timeout, "commit", needs_result=True)

    async def _membership(self, change: str, address: str, timeout: float | None) -> None:
        def invoke(resolve: Callable[[Any, int], None]) -> None:
            assert self._syncobj is not None
            if change == "add":
                self._syncobj.addNodeToCluster(address, callback=resolve)
            else:
                self._syncobj.removeNodeFromCluster(address, callback=resolve)

        await self._call(invoke, timeout, "membership change", needs_result=False)

    async def _membership_retrying(self, change: str, address: str,
                                   timeout: float | None) -> None:
        # The leader denies a change while the previous one is uncommitted, or before its
        # own first entry of the term applies: both pass within moments.
        deadline = asyncio.get_running_loop().time() + (timeout or self.settings.commit_timeout)
        while True:
            try:
                await self._membership(change, address, timeout)
                return
            except RaftUnavailable as exc:
                if "REQUEST_DENIED" not in str(exc) or \
                        asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)

    async def add_member(self, address: str, timeout: float | None = None) -> None:
        """Add a voting member (one change at a time, as pysyncobj requires)."""
        await self._membership_retrying("add", address, timeout)

    async def remove_member(self, address: str, timeout: float | None = None) -> None:
        await self._membership_retrying("remove", address, timeout)

    async def transfer_leadership(self, timeout: float | None = None) -> str:
        """Hand this leader's role to its most caught-up connected follower (Raft's
        TimeoutNow) and return the new leader's address once this node sees it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.settings.commit_timeout)

        def invoke(resolve: Callable[[Any, int], None]) -> None:
            def on_tick() -> None:
                assert self._syncobj is not None
                self._syncobj.transferLeadership(None, callback=resolve)
            self._tick_jobs.append(on_tick)

        while True:
            try:
                await self._call(invoke, timeout, "leadership transfer", needs_result=False)
                break
            except RaftUnavailable as exc:
                # Denied while no follower has caught up with the whole log yet.
                if "REQUEST_DENIED" not in str(exc) or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        while loop.time() < deadline:
            leader = self._syncobj._getLeader() if self._syncobj is not None else None
            if leader is not None and str(leader) != self.settings.self_address:
                return str(leader)
            await asyncio.sleep(0.05)
        raise RaftUnavailable("leadership did not move in time")

    async def barrier(self, timeout: float | None = None) -> None:
        """Return once this node has applied every entry committed before the call."""
        await self.submit(commands.Barrier(), timeout)

    def force_compaction(self) -> None:
        """Snapshot the state and drop the journal entries it covers, at the next tick."""
        if self._syncobj is not None:
            self._syncobj.forceLogCompaction()

    @property
    def is_leader(self) -> bool:
        return self._syncobj is not None and self._syncobj._isLeader()

    def status(self) -> dict[str, Any]:
        if self._syncobj is None:
            return {"state": "stopped"}
        # getStatus iterates dicts a tick mutates: a caller on another thread may race it.
        for _ in range(5):
            try:
                raw = self._syncobj.getStatus()
                break
            except RuntimeError:
                continue
        else:
            return {"state": "unknown"}
        roles = {0: "follower", 1: "candidate", 2: "leader"}
        leader = raw.get("leader")
        partners = {key.removeprefix("partner_node_status_server_"): value == 2
                    for key, value in raw.items()
                    if key.startswith("partner_node_status_server_")}
        match = {key.removeprefix("match_idx_server_"): value for key, value in raw.items()
                 if key.startswith("match_idx_server_")}
        return {
            "self": str(raw["self"]),
            "role": roles.get(raw["state"], str(raw["state"])),
            "leader": str(leader) if leader is not None else None,
            "has_quorum": bool(raw["has_quorum"]),
            "term": raw["raft_term"],
            "commit_index": raw["commit_idx"],
            "applied_index": raw["last_applied"],
            "leader_commit_index": raw["leader_commit_idx"],
            "log_length": raw["log_len"],
            "partners_connected": partners,
            "match_index": match,
            "uptime_seconds": raw["uptime"],
        }

    @property
    def has_leader(self) -> bool:
        """A leader is known and reachable: this node, or one it is connected to. A follower
        keeps naming a dead leader until its election timeout, and longer while it cannot
        reach a quorum; a command sent there meanwhile only times out."""
        return self._reachable_leader() is not None

    def _reachable_leader(self) -> Any:
        syncobj = self._syncobj
        if syncobj is None:
            return None
        leader = syncobj._getLeader()
        if leader is None or not (leader == syncobj.selfNode or syncobj.isNodeConnected(leader)):
            return None
        return leader
