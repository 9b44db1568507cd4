"""Growing and shrinking the cluster: join tokens, the join exchange, removal.

A join is authenticated by a one-time, expiring token that the account root
asked for (only its SHA-256 is replicated). The member that receives the join
consumes the token through Raft (so it works once, cluster-wide), wraps every
domain-key generation in use (active, retiring, and a pending one it holds)
for the newcomer's HSM transport key, seals the cluster's Raft
secret under the same transport key, records the newcomer and adds it as a
voting member through pysyncobj's dynamic membership. Removing the leader
moves leadership to a caught-up follower first.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

from cluster import commands
from cluster import domain_generations as dg
from cluster.raft_node import RaftUnavailable
from kmsd.errors import KMSInternalException, NotFoundException, ValidationException
from kmsd.hsm import domain_clone
from kmsd.service.core import ServiceCore
from kmsd.service.domain_rotation import PeerClient, PeerError

DEFAULT_TOKEN_TTL_SECONDS = 3600
# Member to member: the leader hands its role to a follower (kmsd/api/admin.py).
TRANSFER_LEADERSHIP_PATH = "/v1/internal/raft/transfer-leadership"
TRANSFER_WAIT_SECONDS = 15.0
_ADDRESS = re.compile(r"^[A-Za-z0-9.-]+:\d{1,5}$")
_NODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_join_token(core: ServiceCore, ttl_seconds: float) -> tuple[str, float]:
    token = "kmsd-join-" + secrets.token_urlsafe(32)
    expires_at = core.clock.now() + ttl_seconds
    await core.commit(commands.CreateJoinToken(token_hash(token), expires_at))
    return token, expires_at


@dataclass(frozen=True)
class JoinRequest:
    token: str
    node_id: str
    az: str
    raft_address: str
    api_url: str
    admin_url: str
    transport_point: bytes | None
    # A node whose token already holds a domain key says which (its check value).
    domain_key_check: str | None

    @classmethod
    def parse(cls, body: Any) -> JoinRequest:
        try:
            request = cls(str(body["Token"]), str(body["NodeId"]), str(body.get("Az", "default")),
                          str(body["RaftAddress"]), str(body["ApiUrl"]), str(body["AdminUrl"]),
                          bytes.fromhex(body["TransportPoint"]) if body.get("TransportPoint")
                          else None,
                          str(body["DomainKeyCheck"]) if body.get("DomainKeyCheck") else None)
        except (KeyError, TypeError, ValueError):
            raise ValidationException("A join needs Token, NodeId, RaftAddress, ApiUrl, "
                                      "AdminUrl and a hex TransportPoint.") from None
        if not _NODE_ID.match(request.node_id) or not _ADDRESS.match(request.raft_address):
            raise ValidationException("Invalid node id or Raft address.")
        return request


async def join(core: ServiceCore, raft_secret: str, request: JoinRequest) -> dict[str, Any]:
    if request.node_id in core.state.nodes:
        raise ValidationException(f"A member named {request.node_id} exists already.")
    if request.transport_point is None and request.domain_key_check != \
            core.state.domain_key_check:
        raise ValidationException(
            f"The joining node's HSM holds another domain key (check value "
            f"{request.domain_key_check}, the cluster's is {core.state.domain_key_check}); "
            "it cannot join.")
    await core.commit(commands.ConsumeJoinToken(token_hash(request.token), request.node_id,
                                                core.clock.now()))
    live = core.state.generations_in(*dg.LIVE)
    response: dict[str, Any] = {
        "DomainKeyCheck": core.state.domain_key_check,
        "DomainGenerations": {str(g.generation): g.check for g in live},
        "Peers": sorted({n.raft_address for n in list(core.state.nodes.values())}
                        | {core.raft.settings.self_address}),
        "Regions": list(core.regions), "AccountId": core.account_id,
    }
    if request.transport_point is not None:
        held = core.hsm.held_generations()
        numbers = [g.generation for g in core.state.generations_in(dg.PENDING, *dg.LIVE)
                   if held.get(g.generation) == g.check]
        point, wrapped, sealed = domain_clone.wrap_domain_keys_for(
            core.hsm, request.transport_point, numbers, raft_secret.encode())
        response.update(DonorPoint=point.hex(), SealedSecret=sealed.hex(),
                        WrappedDomainKeys={str(n): w.hex() for n, w in wrapped.items()})
    await core.commit(commands.RegisterNode(request.node_id, request.az, request.raft_address,
                                            request.api_url, request.admin_url))
    try:
        await core.raft.add_member(request.raft_address, timeout=15)
    except RaftUnavailable as exc:
        raise KMSInternalException(f"The Raft membership change failed: {exc}") from None
    return response


async def remove(core: ServiceCore, node_id: str, peers: PeerClient) -> None:
    """Remove a member. pysyncobj's leader cannot remove itself, so when the member is the
    leader its role moves to a caught-up follower first: here if this node leads, else
    through the leader's peer route (TRANSFER_LEADERSHIP_PATH)."""
    member = core.state.nodes.get(node_id)
    if member is None:
        raise NotFoundException(f"No member named {node_id}.")
    if core.raft.status().get("leader") == member.raft_address:
        try:
            if core.raft.is_leader:
                await core.raft.transfer_leadership(timeout=TRANSFER_WAIT_SECONDS)
            else:
                await peers.call(member.admin_url, "POST", TRANSFER_LEADERSHIP_PATH,
                                 timeout=TRANSFER_WAIT_SECONDS + 5)
        except (RaftUnavailable, PeerError) as exc:
            raise KMSInternalException(
                f"{node_id} is the Raft leader and could not hand leadership over: "
                f"{exc}") from None
        await _wait_for_another_leader(core, member.raft_address, 15)
    try:
        await core.raft.remove_member(member.raft_address, timeout=15)
    except RaftUnavailable as exc:
        raise KMSInternalException(f"The Raft membership change failed: {exc}") from None
    await core.commit(commands.DeregisterNode(node_id))


async def _wait_for_another_leader(core: ServiceCore, old_leader: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        status = core.raft.status()
        if status.get("leader") not in (None, old_leader) and status.get("has_quorum"):
            return
        await asyncio.sleep(0.05)
    raise KMSInternalException("No other member took over the Raft leadership in time.")
