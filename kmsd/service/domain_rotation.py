"""Domain-key rotation (`kmsctl domain rotate`), driven by whichever node is the Raft leader.

Every node runs `DomainRotator.run`; only the current leader acts, and it
reads what to do next from the replicated state alone, so a new leader picks
up a rotation where the old one stopped. One step at a time:

1. requested -> the leader makes generation N+1 in its own token and proposes
   BeginDomainRotation with its check value (pending).
2. pending -> the leader sends the new key to every member over the ECDH
   clone transport (kmsd.hsm.domain_clone): the member makes a transport key
   for that generation, the leader's token wraps the domain key to it, the
   member unwraps it and answers its check value. Members are the ones in the
   replicated state, reached at their registered admin URLs through
   peer-authenticated `/v1/internal/domain/*` routes. When every member has
   confirmed, ActivateDomainGeneration (the state machine refuses it if a
   member joined meanwhile and has not confirmed). A leader that does not
   hold the pending generation (its maker died before cloning it) abandons
   it: nothing is wrapped under a pending generation, and the rotation
   starts over with a new one.
3. retiring -> the leader re-wraps the blobs of the old generation in its
   token (kmsd.hsm.rewrap; sealed secrets -- access-key secrets, custom key
   store passwords -- are opened and sealed again; a custom key store's keys
   are under its store key, not re-wrapped) and proposes them in batches of
   REWRAP_BATCH (RewrapDomainBlobs). The state machine applies an item only
   if the blob is still the one re-wrapped, so a concurrent DeleteKey,
   import, password change or deletion wins; the next round picks up
   whatever changed. When no blob refers to the old generation, every member
   that answers has applied the activation (so wraps no more under the old
   one) and RETIRE_GRACE_SECONDS have passed since it, one last look, then
   RetireDomainGeneration. A proposal that still carries a blob of a retired
   generation is refused with a retryable error.
4. retired -> after DESTROY_GRACE_SECONDS (requests that read an old blob
   just before the last re-wrap finish meanwhile), every member destroys
   the retired key in its token (`/v1/internal/domain/sync`); a member that
   was down does it when it starts (kmsd.service.domain_members.reconcile).

Requests keep working throughout: the handle caches are keyed by the blob
bytes, and both generations unwrap until the old one is retired.

Outside a rotation the leader also gives a member any live generation it
lacks (a node restored from an old token backup, for example) and destroys
retired ones wherever they remain.

Never logs, returns or raises with key material or secrets.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import structlog

from cluster import commands
from cluster import domain_generations as dg
from cluster.state import NodeRecord
from kmsd.audit import digests, domain_events
from kmsd.audit.backfill import PEER_HEADER, sign_peer_request
from kmsd.audit.chain import AuditEntry
from kmsd.audit.committer import AuditCommitter, AuditUnavailable
from kmsd.audit.record import user_identity
from kmsd.auth.credentials import secret_aad
from kmsd.errors import KmsError, KMSInternalException
from kmsd.hsm import domain_clone
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError
from kmsd.hsm.rewrap import rewrap_key
from kmsd.service import domain_members
from kmsd.service.context import Caller
from kmsd.service.core import UNAVAILABLE_MESSAGE, ServiceCore
from kmsd.service.key_store_tokens import password_aad

log = structlog.get_logger("kmsd.domain")

REWRAP_BATCH = 32
DESTROY_GRACE_SECONDS = 2.0
# The old generation stays until this long after the activation, and until every member that
# answers has applied it (requests already past their wrap land meanwhile).
RETIRE_GRACE_SECONDS = 1.0
PEER_TIMEOUT_SECONDS = 10.0


class PeerError(Exception):
    """A member did not answer, or refused."""


@dataclass(frozen=True)
class PeerClient:
    """Member-to-member calls, authenticated with the peer HMAC (kmsd.audit.backfill).
    The HMAC covers method, path and query; a body is bound by its SHA-256 in the query."""

    node_id: str
    key: bytes
    ssl_context: ssl.SSLContext | None = None

    async def call(self, admin_url: str, method: str, path: str,
                   body: dict[str, Any] | None = None,
                   timeout: float = PEER_TIMEOUT_SECONDS) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        if data:
            path += ("&" if "?" in path else "?") + "body_sha256=" + hashlib.sha256(
                data).hexdigest()
        request = urllib.request.Request(
            admin_url.rstrip("/") + path, data=data or None, method=method,
            headers={PEER_HEADER: sign_peer_request(self.key, self.node_id, method, path),
                     "Content-Type": "application/json"})

        def send() -> dict[str, Any]:
            with urllib.request.urlopen(request, timeout=timeout,
                                        context=self.ssl_context) as response:
                return json.loads(response.read())

        try:
            return await asyncio.get_running_loop().run_in_executor(None, send)
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}")
            raise PeerError(f"{detail.get('__type', error.code)}: "
                            f"{detail.get('message', '')}") from None
        except (OSError, ValueError) as error:
            raise PeerError(type(error).__name__) from None


def body_matches(query_sha256: str | None, body: bytes) -> bool:
    return query_sha256 is not None and hashlib.sha256(body).hexdigest() == query_sha256


def held_as_json(held: dict[int, str]) -> dict[str, str]:
    return {str(number): check for number, check in sorted(held.items())}


class DomainRotator:
    def __init__(self, core: ServiceCore, peers: PeerClient, interval_seconds: float,
                 audit: AuditCommitter | None = None) -> None:
        self.core = core
        self.peers = peers
        self.interval = interval_seconds
        self.audit = audit
        # What the leader is doing or waiting for, for `kmsctl domain status`.
        self.progress = "idle"
        self._unrewrappable: set[tuple[str, ...]] = set()

    @property
    def node_id(self) -> str:
        return self.peers.node_id

    async def run(self) -> None:
        while True:
            busy = False
            if self.core.raft.is_leader:
                try:
                    busy = await self.step()
                except (KmsError, HsmError) as error:
                    self.progress = f"retrying: {type(error).__name__}"
                    log.warning("domain_rotation_step_failed", error=type(error).__name__)
                except Exception as error:  # noqa: BLE001 - a dead rotator would stall silently
                    self.progress = f"retrying after an unexpected {type(error).__name__}"
                    log.error("domain_rotation_step_crashed", error=type(error).__name__)
            await asyncio.sleep(0 if busy else self.interval)

    async def step(self) -> bool:
        """One unit of work; True if there is more to do at once."""
        state = self.core.state
        if not state.domain_generations:
            return False
        pending = state.generations_in(dg.PENDING)
        if pending:
            return await self._clone(pending[0])
        retiring = state.generations_in(dg.RETIRING)
        if retiring:
            return await self._rewrap_or_retire(retiring[0])
        if state.domain_rotation_requested_at is not None:
            return await self._begin()
        await self._keep_members()
        return False

    # -- 1. a new generation -----------------------------------------------------

    async def _begin(self) -> bool:
        # A leader fresh from an election may not have applied all it knows committed yet:
        # the earlier leader's BeginDomainRotation may be among it.
        await self.core.catch_up()
        state = self.core.state
        if state.rotation_in_progress or state.domain_rotation_requested_at is None:
            return True
        hsm = self.core.hsm
        number = max(state.domain_generations) + 1
        if hsm.has_domain_key(number):
            # Made by an earlier attempt whose proposal never committed.
            hsm.destroy_generation(number)
        check = hsm.create_domain_key(number)
        self.progress = f"generation {number}: created"
        try:
            await self.core.commit(commands.BeginDomainRotation(number, check,
                                                                self.core.clock.now()))
        except KmsError:
            if self.core.state.domain_generations.get(number) is None:
                hsm.destroy_generation(number)
            raise
        log.info("domain_rotation_begun", generation=number, check=check)
        await self._record(domain_events.BEGUN, number, check)
        return True

    # -- 2. cloning to every member ------------------------------------------------

    async def _clone(self, generation: dg.DomainGeneration) -> bool:
        number = generation.generation
        if self.core.hsm.held_generations().get(number) != generation.check:
            await self.core.catch_up()
            if self.core.state.domain_generations.get(number) != generation:
                return True  # the log moved on meanwhile: look again
            await self.core.commit(commands.AbandonDomainGeneration(number, self.core.clock.now()))
            log.warning("domain_generation_abandoned", generation=number)
            await self._record(domain_events.ABANDONED, number, generation.check)
            self.progress = f"generation {number}: abandoned (its maker left); starting over"
            return True
        confirmed, waiting = [self.node_id], []
        for member in self._other_members():
            try:
                await self._ensure_holds(member, generation)
                confirmed.append(member.node_id)
            except PeerError as error:
                waiting.append(member.node_id)
                log.info("domain_clone_waiting", generation=number, member=member.node_id,
                         reason=str(error))
        if waiting:
            self.progress = f"generation {number}: waiting for {', '.join(waiting)}"
            return False
        await self.core.commit(commands.ActivateDomainGeneration(
            number, tuple(sorted(confirmed)), self.core.clock.now()))
        self.progress = f"generation {number}: active; re-wrapping"
        log.info("domain_generation_active", generation=number, members=len(confirmed))
        await self._record(domain_events.ACTIVATED, number, generation.check)
        return True

    def _other_members(self) -> list[NodeRecord]:
        return sorted((n for n in list(self.core.state.nodes.values())
                       if n.node_id != self.node_id), key=lambda n: n.node_id)

    async def _ensure_holds(self, member: NodeRecord, generation: dg.DomainGeneration) -> None:
        number = generation.generation
        held = await self.peers.call(member.admin_url, "GET", "/v1/internal/domain/held")
        if held.get("Held", {}).get(str(number)) == generation.check:
            return
        point = await self.peers.call(member.admin_url, "POST",
                                      f"/v1/internal/domain/transport?generation={number}")
        donor_point, wrapped, _ = domain_clone.wrap_domain_keys_for(
            self.core.hsm, bytes.fromhex(point["TransportPoint"]), [number])
        answer = await self.peers.call(
            member.admin_url, "POST", f"/v1/internal/domain/accept?generation={number}",
            {"DonorPoint": donor_point.hex(), "WrappedDomainKey": wrapped[number].hex()})
        if answer.get("Check") != generation.check:
            raise PeerError(f"{member.node_id} holds another key for generation {number}")
        log.info("domain_generation_cloned", generation=number, member=member.node_id)

    # -- 3. re-wrapping ------------------------------------------------------------

    async def _rewrap_or_retire(self, generation: dg.DomainGeneration) -> bool:
        state = self.core.state
        number = generation.generation
        remaining = [b for b in dg.stored_blobs(state) if b.generation == number]
        if not remaining:
            activated = state.domain_generations[state.active_generation].changed_at
            if self.core.clock.now() - activated < RETIRE_GRACE_SECONDS:
                self.progress = f"generation {number}: re-wrapped; retiring shortly"
                return False
            lagging = await self._not_yet_active(state.active_generation)
            if lagging:
                self.progress = (f"generation {number}: re-wrapped; waiting for "
                                 f"{', '.join(lagging)} to apply the new generation")
                return False
            # A blob wrapped just before a member applied the activation may have reached
            # the log meanwhile: look once more.
            await self.core.catch_up()
            if any(b.generation == number for b in dg.stored_blobs(self.core.state)):
                return True
            await self.core.commit(commands.RetireDomainGeneration(number, self.core.clock.now()))
            self.progress = f"generation {number}: retired; destroying"
            log.info("domain_generation_retired", generation=number)
            await self._record(domain_events.RETIRED, number, generation.check)
            return True
        batch = [b for b in remaining if b.locator not in self._unrewrappable][:REWRAP_BATCH]
        if not batch:
            self.progress = (f"generation {number}: {len(remaining)} blobs cannot be "
                             "re-wrapped (see the log)")
            return False
        items = []
        active = state.active_generation
        for stored in batch:
            try:
                items.append((stored.locator, stored.blob, self._rewrap(stored)))
            except (HsmError, HsmAuthenticationFailed):
                self._unrewrappable.add(stored.locator)
                log.error("domain_rewrap_failed", locator=list(stored.locator))
            await asyncio.sleep(0)  # one HSM call at a time, then let requests run
        if items:
            replaced, skipped = await self.core.commit(
                commands.RewrapDomainBlobs(active, tuple(items)))
            log.info("domain_blobs_rewrapped", generation=active, replaced=replaced,
                     skipped=skipped)
        self.progress = (f"generation {number}: re-wrapping, "
                         f"{max(0, len(remaining) - len(items))} blobs left")
        return True

    async def _record(self, step: str, number: int, check: str) -> None:
        """The audit record of a step already committed; a lost one is logged, not retried."""
        if self.audit is None:
            return
        event = domain_events.domain_event(step, number, check, self.core.regions[0],
                                           self.core.account_id)
        try:
            await self.audit.commit((AuditEntry.of(event, self.node_id).event_bytes,
                                     self.node_id, (), ()))
        except AuditUnavailable:
            log.warning("domain_rotation_audit_failed", step=step, generation=number)

    async def _not_yet_active(self, active: int) -> list[str]:
        """Members that answer but have not applied the activation yet: they may still wrap
        new keys under the retiring generation. One that does not answer proposes nothing,
        and applies the whole log before it serves again."""
        lagging = []
        for member in self._other_members():
            try:
                answer = await self.peers.call(member.admin_url, "GET",
                                               "/v1/internal/domain/held")
            except PeerError:
                continue
            if answer.get("ActiveGeneration") != active:
                lagging.append(member.node_id)
        return lagging

    def _rewrap(self, stored: dg.StoredBlob) -> bytes:
        hsm = self.core.hsm
        kind = stored.locator[0]
        if kind == dg.ACCESS_KEY_SECRET:
            return hsm.reseal(stored.blob, secret_aad(stored.locator[1]))
        if kind == dg.CUSTOM_KEY_STORE_PASSWORD:
            return hsm.reseal(stored.blob, password_aad(stored.locator[1]))
        if kind == dg.AUDIT_SIGNING_KEY:
            return rewrap_key(hsm, stored.blob, digests.KEY_SPEC)
        if stored.key_spec is None:
            raise HsmError("no key spec for the blob")
        return rewrap_key(hsm, stored.blob, stored.key_spec)

    # -- 4. keeping members in line ------------------------------------------------

    async def _keep_members(self) -> None:
        state = self.core.state
        now = self.core.clock.now()
        gone = {g.generation for g in state.generations_in(dg.RETIRED, dg.ABANDONED)
                if now - g.changed_at >= DESTROY_GRACE_SECONDS}
        domain_members.reconcile(
            {n: g for n, g in state.domain_generations.items()
             if g.state not in (dg.RETIRED, dg.ABANDONED) or n in gone}, self.core.hsm)
        lagging = []
        for member in self._other_members():
            try:
                held = {int(k): v for k, v in (await self.peers.call(
                    member.admin_url, "GET", "/v1/internal/domain/held"))["Held"].items()}
                for number in domain_members.missing_live(state.domain_generations, held):
                    await self._ensure_holds(member, state.domain_generations[number])
                if gone & set(held):
                    await self.peers.call(member.admin_url, "POST", "/v1/internal/domain/sync")
            except (PeerError, KeyError, ValueError):
                lagging.append(member.node_id)
        self.progress = "idle" if not lagging else f"idle; unreachable: {', '.join(lagging)}"


# -- status --------------------------------------------------------------------------

async def cluster_status(core: ServiceCore, peers: PeerClient,
                         rotator: DomainRotator) -> dict[str, Any]:
    """Generations, how many blobs each wraps, and what every member's token holds."""
    state = core.state
    counts = dg.blobs_by_generation(state)
    members = []
    for member in sorted(list(state.nodes.values()), key=lambda n: n.node_id):
        if member.node_id == peers.node_id:
            held: dict[str, str] | None = held_as_json(core.hsm.held_generations())
        else:
            try:
                held = (await peers.call(member.admin_url, "GET",
                                         "/v1/internal/domain/held"))["Held"]
            except (PeerError, KeyError):
                held = None
        members.append({"NodeId": member.node_id, "Reachable": held is not None,
                        "Held": held})
    live = {str(g.generation): g.check for g in state.generations_in(*dg.LIVE)}
    in_progress = state.rotation_in_progress or state.domain_rotation_requested_at is not None
    # A member that cannot be reached destroys retired keys itself when it starts again.
    settled = all(m["Held"] == live for m in members if m["Held"] is not None)
    phase = ("requested" if state.domain_rotation_requested_at is not None
             else "cloning" if state.generations_in(dg.PENDING)
             else "rewrapping" if state.generations_in(dg.RETIRING)
             else "destroying" if not settled else "idle")
    return {
        "ActiveGeneration": state.active_generation,
        "Phase": phase,
        "InProgress": in_progress or not settled,
        "LeaderProgress": rotator.progress if core.raft.is_leader else None,
        "Generations": [{"Generation": g.generation, "Check": g.check, "State": g.state,
                         "CreatedAt": g.created_at, "ChangedAt": g.changed_at,
                         "Blobs": counts.get(g.generation, 0)}
                        for g in sorted(state.domain_generations.values(),
                                        key=lambda g: g.generation)],
        "Members": members,
    }


async def request_rotation(core: ServiceCore, audit: AuditCommitter | None, caller: Caller,
                           node_id: str, request_id: str) -> bool:
    """Record the operator's request in the audit chain (fail closed: no record, no
    rotation), then in the state; the leader takes it from there."""
    if audit is not None:
        identity = user_identity(caller.principal_arn, caller.account_id,
                                 caller.access_key_id).to_dict()
        event = domain_events.domain_event(domain_events.REQUESTED, None, None,
                                           core.regions[0], core.account_id, identity,
                                           request_id)
        try:
            await audit.commit((AuditEntry.of(event, node_id).event_bytes, node_id, (), ()))
        except AuditUnavailable:
            raise KMSInternalException(UNAVAILABLE_MESSAGE) from None
    return bool(await core.commit(commands.RequestDomainRotation(core.clock.now())))

