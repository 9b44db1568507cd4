"""One kmsd node: an HSM partition, a Raft member and two HTTP listeners in one process.

Start-up order: open the token and find a domain key (a node without one
refuses to start) → start Raft → listen → in the background, once the cluster
has a leader: record the first domain-key check value or compare the token
with the domain-key generations in the state (a token holding another key
for generation 1 never serves; retired generations are destroyed; a live
generation the token lacks is waited for, the leader sends it), register this
node as a member, and add bootstrap credentials if the environment carries
them. `/readyz` turns 200 only after all of that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
from typing import Any

import structlog
from aiohttp import web

from cluster import commands
from cluster.raft_node import RaftNode, RaftSettings, RaftUnavailable
from cluster.state import (
    Applied,
    KmsState,
    Rejected,
)
from kmsd import bootstrap, domain_blob, gc_pauses, sd_notify
from kmsd.api.admin import make_admin_app
from kmsd.api.api_app import make_api_server
from kmsd.api.protocol import KmsProtocol
from kmsd.api.validation import RequestValidator
from kmsd.api_workers.hub import FencedRaft, WorkerHub, worker_command
from kmsd.audit.backfill import Backfiller, peer_key
from kmsd.audit.committer import AuditCommitter
from kmsd.audit.digest_signer import DigestSigner
from kmsd.audit.sink import SegmentSink
from kmsd.auth.credentials import secret_aad
from kmsd.clock import Clock
from kmsd.config import NodeConfig
from kmsd.errors import KMSInternalException
from kmsd.hsm.asymmetric import AsymmetricKeys
from kmsd.hsm.partition import HsmAuthenticationFailed
from kmsd.loop_lag import LoopLagProbe
from kmsd.metrics import NodeFacts, NodeMetrics
from kmsd.service import domain_members, principals
from kmsd.service.domain_rotation import DomainRotator, PeerClient
from kmsd.service.scheduler import KeyScheduler
from kmsd.serving import serving_parts, tls_server_context
from kmsd.tls import certificate_expiry

log = structlog.get_logger("kmsd.node")

# How often the leader signs the audit chain head (when it has grown).
AUDIT_DIGEST_INTERVAL_SECONDS = 300.0


PEERS_FILE = "raft-peers.json"
# /readyz answers 503 while this node is further behind the leader's commit index.
READY_MAX_LAG_ENTRIES = 100
RESTORE_FILE = "restore-snapshot.msgpack"


def membership_peers(config: NodeConfig) -> tuple[str, ...]:
    """The Raft peers: from `kmsd join` (data dir) if this node joined, else the config."""
    path = os.path.join(config.data_dir, PEERS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            peers = json.load(handle)
        return tuple(p for p in peers if p != config.raft_address)
    return config.raft_peers


class Node:
    def __init__(self, config: NodeConfig, clock: Clock | None = None,
                 worker_command: list[str] | None = None) -> None:
        self.config = config
        self.state = KmsState()
        self._raft_password = config.raft_password.read("Raft password")
        self.raft = RaftNode(RaftSettings(
            self_address=config.raft_address, peer_addresses=membership_peers(config),
            data_dir=os.path.join(config.data_dir, "raft"),
            password=self._raft_password,
            compaction_min_entries=config.compaction_min_entries,
            compaction_min_seconds=config.compaction_min_seconds), self.state,
            self._on_applied)
        self.parts = serving_parts(config, self.state, self.raft, clock)
        self.clock, self.hsm, self.core = self.parts.clock, self.parts.hsm, self.parts.core
        self.asymmetric, self.effects = self.parts.asymmetric, self.parts.effects
        self.credentials, self.authenticator = self.parts.credentials, self.parts.authenticator
        self.audit_sink = SegmentSink(os.path.join(config.data_dir, "audit"))
        self.metrics = NodeMetrics(NodeFacts(
            node_id=config.node_id, az=config.az, region=config.default_region,
            raft_status=self.raft.status,
            key_states=lambda: [k.key_state for k in list(self.state.keys.values())],
            cache_counts=self._cache_counts,
            certificate_expiry=lambda: (certificate_expiry(config.tls_certificate)
                                        if config.tls_certificate else None)))
        self.hsm.observe = self.metrics.observe_hsm
        self.loop_lag = LoopLagProbe(self.metrics.loop_lag.observe)
        self.audit = AuditCommitter(self.raft, on_batch=self.metrics.observe_audit_batch,
                                    on_failure=self.metrics.audit_commit_failures.inc)
        self.digest_signer = DigestSigner(self.core, self.audit, AsymmetricKeys(self.hsm),
                                          config.node_id, AUDIT_DIGEST_INTERVAL_SECONDS)
        self.peers = PeerClient(config.node_id, peer_key(self._raft_password),
                                self._peer_ssl_context())
        self.domain_rotator = DomainRotator(self.core, self.peers,
                                            config.scheduler_interval_seconds, self.audit)
        self.protocol = KmsProtocol(self.core, self.authenticator, RequestValidator(),
                                    self.not_ready_reason, self.audit, config.node_id,
                                    self.metrics.observe_request)
        self.workers: WorkerHub | None = None
        if config.api_workers and worker_command:
            self.workers = WorkerHub(
                config.api_workers, worker_command, self.raft, self.state, self.audit,
                self._worker_status, self.rendered_metrics, self.readiness,
                self.metrics.merge_observed)
            # Writes are answered once every worker applied them (kmsd.api_workers.hub).
            self.core.raft = FencedRaft(self.raft, self.workers)  # type: ignore[assignment]
        self._not_ready = "The node is starting."
        self._runners: list[web.BaseRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_applied(self, command: commands.Command, result: object) -> None:
        """Runs in the Raft tick after every apply: side effects that live outside the state."""
        if isinstance(command, commands.AppendAudit):
            if isinstance(result, Applied):
                self.audit_sink.put(result.value)
            self.audit.on_applied(command, result)  # type: ignore[arg-type]
            return
        if self.effects.applied(command, result) and isinstance(command, commands.DeleteKey):
            # The journal is compacted so the deleted material leaves the disk.
            self.raft.force_compaction()

    def cached_handles(self) -> int:
        """Unwrapped keys this node holds as HSM session objects (on the event loop's side),
        its API workers' included."""
        workers = self.workers.reported("cached_handles") if self.workers else 0
        return self.parts.cached_handles() + workers

    def _cache_counts(self) -> tuple[int, int]:
        hits, misses = self.hsm.handle_cache_hits, self.hsm.handle_cache_misses
        if self.workers is not None:
            hits += self.workers.reported("cache_hits")
            misses += self.workers.reported("cache_misses")
        return hits, misses

    # -- readiness -----------------------------------------------------------

    def not_ready_reason(self) -> str | None:
        return self._not_ready

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """/readyz: in a quorum (knows a leader), domain key verified, and caught up."""
        raft = self.raft.status()
        lag = max(0, (raft.get("leader_commit_index") or 0) - (raft.get("applied_index") or 0))
        reason = self._not_ready
        if reason is None and not self.raft.has_leader:
            reason = "No Raft leader is reachable."
        if reason is None and lag > READY_MAX_LAG_ENTRIES:
            reason = f"Applying the log: {lag} entries behind."
        return (200 if reason is None else 503), {"ready": reason is None, "reason": reason,
                                                  "lag": lag}

    def _worker_status(self) -> dict[str, Any]:
        return {"not_ready": self._not_ready, "has_leader": self.raft.has_leader}

    async def _bootstrap(self) -> None:
        while True:
            try:
                await self._bootstrap_once()
                return
            except (RaftUnavailable, KMSInternalException):
                # No quorum yet, or a commit timed out (KMSInternalException from the
                # service layer): try again; the node is not ready meanwhile.
                await asyncio.sleep(0.2)

    async def _bootstrap_once(self) -> None:
        while not self.raft.has_leader:
            await asyncio.sleep(0.05)
        await self.raft.barrier()
        if not self.state.domain_generations:
            # A new cluster: the first node to propose names generation 1.
            first = self.hsm.held_generations().get(1)
            if first is not None:
                await self.raft.submit(commands.InitCluster(first))
        if not await self._domain_keys_in_line():
            return
        member = commands.RegisterNode(self.config.node_id, self.config.az,
                                       self.config.raft_address, self.config.public_url,
                                       self.config.admin_url)
        existing = self.state.nodes.get(self.config.node_id)
        if existing is None or (existing.az, existing.raft_address, existing.api_url,
                                existing.admin_url) != (member.az, member.raft_address,
                                                        member.api_url, member.admin_url):
            await self.raft.submit(member)
        await self._restore_pending_snapshot()
        await self._bootstrap_credentials()
        await self.digest_signer.ensure_key()
        # The state as restored and caught up is lasting too; the only requests so far
        # were refused as not ready.
        gc_pauses.freeze_heap()
        self._not_ready = None
        sd_notify.status(f"serving as {self.config.node_id}")
        log.info("node_ready", domain_key_check=self.state.domain_key_check,
                 domain_generation=self.state.active_generation)

    async def _domain_keys_in_line(self) -> bool:
        """Bring the token in line with the state's domain-key generations. False if it holds
        another key for generation 1 (it never serves); waits for live generations it lacks,
        which the leader sends (kmsd.service.domain_rotation)."""
        while True:
            generations = dict(self.state.domain_generations)
            held = domain_members.reconcile(generations, self.hsm)
            first = generations.get(1)
            if first is not None and 1 in held and held[1] != first.check:
                self._not_ready = (f"This node's HSM token {self.config.token_label!r} holds a "
                                   "different domain key than the cluster; it will not serve.")
                log.error("domain_key_mismatch", token=self.config.token_label,
                          node_check=held[1], cluster_check=first.check)
                sd_notify.status(self._not_ready)
                return False
            missing = domain_members.missing_live(generations, held)
            if generations and not missing:
                return True
            if not generations:
                self._not_ready = ("This node's HSM token holds no domain key of generation 1 "
                                   "and the cluster has none recorded.")
            else:
                self._not_ready = ("Waiting for domain-key generation(s) "
                                   f"{', '.join(map(str, missing))} from the leader.")
            await asyncio.sleep(0.5)

    async def _restore_pending_snapshot(self) -> None:
        """`kmsd restore` left a state snapshot in the data dir: load it through Raft."""
        path = os.path.join(self.config.data_dir, RESTORE_FILE)
        if not os.path.exists(path):
            return
        with open(path, "rb") as handle:
            snapshot = handle.read()
        result = await self.raft.submit(commands.RestoreSnapshot(snapshot))
        if isinstance(result, Rejected):
            log.error("restore_refused", reason=result.message)
        else:
            log.info("state_restored", keys=result.value)
        os.replace(path, path + ".done")

    async def _bootstrap_credentials(self) -> None:
        await principals.ensure_root(self.core)
        sealed = bootstrap.pending(self.config.data_dir)
        if sealed is None:
            return
        if sealed.access_key_id not in self.state.access_keys:
            secret = sealed.sealed_secret
            if domain_blob.seal_generation(secret) != self.state.active_generation:
                # `kmsd init` sealed it under the newest key in the token, which may not be
                # the cluster's active generation (a rotation was under way).
                try:
                    secret = self.hsm.reseal(secret, secret_aad(sealed.access_key_id))
                except HsmAuthenticationFailed:
                    log.error("bootstrap_access_key_unreadable",
                              access_key_id=sealed.access_key_id)
                    return
            await principals.add_sealed_access_key(
                self.core, principals.root_arn(self.config.account_id), sealed.access_key_id,
                secret)
            log.info("bootstrap_access_key_added", access_key_id=sealed.access_key_id)
        bootstrap.done(self.config.data_dir)

    def _peer_admin_urls(self) -> list[str]:
        return [n.admin_url for n in list(self.state.nodes.values())
                if n.node_id != self.config.node_id]

    def _peer_ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.tls_certificate:
            return None
        # Members present certificates from the cluster's CA (api.tls_ca), else public ones.
        return ssl.create_default_context(cafile=self.config.tls_ca)

    # -- status --------------------------------------------------------------

    async def _gather_worker_reports(self) -> None:
        """Every API worker's counts of requests, HSM calls and handles, as of every request
        answered before this call (see WorkerHub.gather_observed)."""
        if self.workers is not None:
            await self.workers.gather_observed()

    async def current_status(self) -> dict[str, Any]:
        await self._gather_worker_reports()
        return self.status()

    async def rendered_metrics(self) -> bytes:
        """/metrics, whichever process serves it."""
        await self._gather_worker_reports()
        return self.metrics.render()

    def status(self) -> dict[str, Any]:
        held = self.hsm.held_generations()
        return {
            "node_id": self.config.node_id,
            "az": self.config.az,
            "api_url": self.config.public_url,
            "admin_url": self.config.admin_url,
            "ready": self._not_ready is None,
            "not_ready_reason": self._not_ready,
            "hsm": {"module": self.config.hsm_module, "token_label": self.config.token_label,
                    "domain_key_check": held.get(self.state.active_generation),
                    "domain_key_verified": (self.state.domain_key_check is not None and
                                            held.get(self.state.active_generation)
                                            == self.state.domain_key_check),
                    "domain_generations": {str(k): v for k, v in sorted(held.items())},
                    "handle_cache_hits": self._cache_counts()[0],
                    "handle_cache_misses": self._cache_counts()[1],
                    "cached_handles": self.cached_handles()},
            "raft": self.raft.status(),
            "audit": {"chain_head": {"seq": self.state.audit.head.seq,
                                     "hash": self.state.audit.head.hash},
                      "written_head": ({"seq": written.seq, "hash": written.hash}
                                       if (written := self.audit_sink.head) else None),
                      "segment_gap": self.audit_sink.gap,
                      "commits": self.audit.metrics.as_dict()},
            "keys": len(self.state.keys),
            "api_workers": {"configured": self.config.api_workers,
                            "pids": self.workers.pids if self.workers else []},
        }

    # -- HTTP ----------------------------------------------------------------

    def api_server(self) -> web.Server:
        async def readiness() -> tuple[int, dict[str, Any]]:
            return self.readiness()

        return make_api_server(self.protocol.handle, readiness, self.rendered_metrics)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.audit.attach(self._loop)
        self.effects.loop = self._loop
        self.asymmetric.start()
        self.raft.start()
        self.loop_lag.start(self._loop)  # the loop now runs the Raft ticks too
        # With API workers the primary leaves the API port to them: it keeps its CPU for
        # what only it does (Raft, the audit chain and its files, the admin API), which
        # every worker's requests wait on.
        admin = web.AppRunner(make_admin_app(self.authenticator, self.core, self.current_status,
                                             self.audit_sink, self.digest_signer,
                                             self._raft_password, self.domain_rotator,
                                             self.peers), access_log=None)
        runners: list[tuple[web.BaseRunner, str]] = [(admin, self.config.admin_listen)]
        if self.workers is None:
            runners.insert(0, (web.ServerRunner(self.api_server()), self.config.api_listen))
        # Before listening: from then on requests come, and their garbage must not freeze.
        self.metrics.gc_pauses.install()
        gc_pauses.freeze_heap()
        for runner, listen in runners:
            await runner.setup()
            host, _, port = listen.rpartition(":")
            await web.TCPSite(runner, host, int(port),
                              ssl_context=tls_server_context(self.config)).start()
            self._runners.append(runner)
        if self.workers is not None:
            await self.workers.start()
        self._tasks = [asyncio.create_task(self._bootstrap()),
                       asyncio.create_task(KeyScheduler(
                           self.core, self.config.scheduler_interval_seconds).run()),
                       asyncio.create_task(self.digest_signer.run()),
                       asyncio.create_task(self.domain_rotator.run()),
                       asyncio.create_task(Backfiller(
                           self.audit_sink, self.config.node_id, self._raft_password,
                           self._peer_admin_urls, self._peer_ssl_context()).run())]
        # systemd Type=notify: "started" once listening. Serving needs a quorum, which may be
        # minutes away after an outage; a start timeout must not kill the node meanwhile.
        sd_notify.ready("waiting for a leader")
        log.info("node_started", api=self.config.api_listen, admin=self.config.admin_listen,
                 raft=self.config.raft_address)

    async def stop(self) -> None:
        sd_notify.stopping()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.workers is not None:
            await self.workers.stop()
        for runner in self._runners:
            await runner.cleanup()
        self.raft.stop()
        self.audit_sink.close()
        await self.asymmetric.stop()
        self.core.key_stores.close_all()
        self.hsm.close()
        self.metrics.gc_pauses.uninstall()
        self.loop_lag.stop()
        log.info("node_stopped")


async def serve(config: NodeConfig, config_path: str | None = None) -> None:
    node = Node(config, worker_command=worker_command(config_path) if config_path else None)
    await node.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await node.stop()
