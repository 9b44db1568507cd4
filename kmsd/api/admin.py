"""The admin API that kmsctl talks to: a separate port, the same SigV4 credentials.

Routes:
    GET    /v1/audit/...                                     see kmsd/api/admin_audit.py
    GET    /v1/domain, POST /v1/domain/rotate                see kmsd/api/admin_domain.py
    GET    /v1/node/status                                   this node's role, indexes, HSM
    GET    /v1/hsm/capabilities                              what this node's token does per
                                                             KMS key spec and algorithm
    GET    /v1/cluster/members                               members in the replicated state
    GET    /v1/principals                                    users, roles, the account root
    POST   /v1/principals                  {"Kind", "Name"}  create a user or role
    DELETE /v1/principals/{kind}/{name}                      delete it and its access keys
    POST   /v1/principals/{kind}/{name}/access-keys          new key; the secret is shown once
    DELETE /v1/access-keys/{access_key_id}
    PUT    /v1/principals/{kind}/{name}/policies/{policy}    attach an identity policy
    DELETE /v1/principals/{kind}/{name}/policies/{policy}
    POST   /v1/cluster/join-tokens         {"TtlSeconds"}    a one-time join token
    POST   /v1/cluster/join                                  a new member joins (token auth)
    POST   /v1/cluster/remove              {"NodeId"}        remove a member (the leader too:
                                                             its role moves first)
    GET    /v1/snapshot                                      the replicated state (wrapped)
    POST   /v1/internal/raft/transfer-leadership             member to member: the leader
                                                             hands its role to a follower

Principal management is for the account root only.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from cluster.raft_node import RaftUnavailable
from kmsd.api.admin_audit import add_audit_routes
from kmsd.api.admin_domain import add_domain_routes
from kmsd.api.protocol import Authenticator, error_response, json_response
from kmsd.audit.backfill import PEER_HEADER, peer_key, verify_peer_request
from kmsd.audit.digest_signer import DigestSigner
from kmsd.audit.sink import SegmentSink
from kmsd.errors import (
    AccessDeniedException,
    KmsError,
    KMSInternalException,
    SerializationException,
    ValidationException,
)
from kmsd.service import membership, principals
from kmsd.service.asymmetric_hsm import capabilities_report
from kmsd.service.context import Caller
from kmsd.service.core import ServiceCore
from kmsd.service.domain_rotation import DomainRotator, PeerClient

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
_CALLER = web.AppKey("caller", Caller)


def make_admin_app(authenticator: Authenticator, core: ServiceCore,
                   node_status: StatusSource, audit_sink: SegmentSink,
                   digest_signer: DigestSigner, raft_secret: str,
                   domain_rotator: DomainRotator, peers: PeerClient) -> web.Application:
    peer_key_bytes = peer_key(raft_secret)

    @web.middleware
    async def authenticate(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        try:
            if request.path == "/v1/cluster/join":
                # The joining node has no credentials: its one-time join token authenticates.
                return await handler(request)
            if request.path.startswith("/v1/internal/"):
                # Member to member: an HMAC under a key only holders of the Raft secret have.
                if not verify_peer_request(peer_key_bytes, request.headers.get(PEER_HEADER, ""),
                                           request.method, request.path_qs):
                    raise AccessDeniedException("Peer authentication failed.")
                return await handler(request)
            caller, _region = authenticator.authenticate(request, await request.read())
            request[_CALLER] = caller
            return await handler(request)
        except KmsError as error:
            return error_response(error, request_id)

    def respond(body: dict[str, Any], status: int = 200) -> web.Response:
        return json_response(body, str(uuid.uuid4()), status)

    def root_only(request: web.Request) -> None:
        principals.require_root(request[_CALLER])

    async def body_json(request: web.Request) -> Any:
        try:
            return json.loads(await request.read() or b"{}")
        except ValueError:
            raise SerializationException("The request body is not valid JSON.") from None

    async def hsm_capabilities(_request: web.Request) -> web.Response:
        return respond(capabilities_report(core))

    async def status(_request: web.Request) -> web.Response:
        return respond(await node_status())

    async def cluster_members(_request: web.Request) -> web.Response:
        return respond({"members": [dataclasses.asdict(m)
                                    for m in list(core.state.nodes.values())]})

    async def list_principals(request: web.Request) -> web.Response:
        root_only(request)
        records = sorted(list(core.state.principals.values()), key=lambda p: p.arn)
        return respond({"Principals": [principals.describe(core, p) for p in records]})

    async def create_principal(request: web.Request) -> web.Response:
        root_only(request)
        body = await body_json(request)
        if not isinstance(body, dict):
            raise SerializationException("Expected a JSON object.")
        record = await principals.create_principal(core, str(body.get("Kind", "")),
                                                   str(body.get("Name", "")))
        return respond({"Principal": principals.describe(core, record)})

    async def delete_principal(request: web.Request) -> web.Response:
        root_only(request)
        await principals.delete_principal(core, request.match_info["kind"],
                                          request.match_info["name"])
        return respond({})

    async def create_access_key(request: web.Request) -> web.Response:
        root_only(request)
        key = await principals.create_access_key(core, request.match_info["kind"],
                                                 request.match_info["name"])
        return respond({"AccessKeyId": key.access_key_id,
                        "SecretAccessKey": key.secret_access_key})

    async def delete_access_key(request: web.Request) -> web.Response:
        root_only(request)
        await principals.delete_access_key(core, request.match_info["access_key_id"])
        return respond({})

    async def put_policy(request: web.Request) -> web.Response:
        root_only(request)
        document = (await request.read()).decode("utf-8", "replace")
        await principals.put_policy(core, request.match_info["kind"], request.match_info["name"],
                                    request.match_info["policy"], document)
        return respond({})

    async def delete_policy(request: web.Request) -> web.Response:
        root_only(request)
        await principals.delete_policy(core, request.match_info["kind"],
                                       request.match_info["name"], request.match_info["policy"])
        return respond({})

    async def join_token(request: web.Request) -> web.Response:
        root_only(request)
        body = await body_json(request)
        ttl = body.get("TtlSeconds", membership.DEFAULT_TOKEN_TTL_SECONDS) \
            if isinstance(body, dict) else membership.DEFAULT_TOKEN_TTL_SECONDS
        if not isinstance(ttl, int | float) or not 1 <= ttl <= 7 * 86400:
            raise ValidationException("TtlSeconds must be between 1 and 604800.")
        token, expires_at = await membership.create_join_token(core, float(ttl))
        return respond({"JoinToken": token, "ExpiresAt": expires_at})

    async def join(request: web.Request) -> web.Response:
        body = await body_json(request)
        return respond(await membership.join(core, raft_secret,
                                             membership.JoinRequest.parse(body)))

    async def remove(request: web.Request) -> web.Response:
        root_only(request)
        body = await body_json(request)
        await membership.remove(core, str(body.get("NodeId", "")) if isinstance(body, dict)
                                else "", peers)
        return respond({})

    async def transfer_leadership(_request: web.Request) -> web.Response:
        if not core.raft.is_leader:
            raise ValidationException("This member is not the Raft leader.")
        try:
            leader = await core.raft.transfer_leadership(
                timeout=membership.TRANSFER_WAIT_SECONDS)
        except RaftUnavailable as exc:
            raise KMSInternalException(f"Leadership could not be handed over: {exc}") from None
        return respond({"Leader": leader})

    async def snapshot(request: web.Request) -> web.Response:
        root_only(request)
        # The whole replicated state: key material appears in it only wrapped.
        return web.Response(body=core.state.to_snapshot(), content_type="application/msgpack")

    app = web.Application(middlewares=[authenticate], client_max_size=64 * 1024)
    app.router.add_get("/v1/snapshot", snapshot)
    app.router.add_post("/v1/cluster/join-tokens", join_token)
    app.router.add_post("/v1/cluster/join", join)
    app.router.add_post("/v1/cluster/remove", remove)
    app.router.add_post(membership.TRANSFER_LEADERSHIP_PATH, transfer_leadership)
    app.router.add_get("/v1/node/status", status)
    app.router.add_get("/v1/hsm/capabilities", hsm_capabilities)
    app.router.add_get("/v1/cluster/members", cluster_members)
    app.router.add_get("/v1/principals", list_principals)
    app.router.add_post("/v1/principals", create_principal)
    app.router.add_delete("/v1/principals/{kind}/{name}", delete_principal)
    app.router.add_post("/v1/principals/{kind}/{name}/access-keys", create_access_key)
    app.router.add_delete("/v1/access-keys/{access_key_id}", delete_access_key)
    app.router.add_put("/v1/principals/{kind}/{name}/policies/{policy}", put_policy)
    app.router.add_delete("/v1/principals/{kind}/{name}/policies/{policy}", delete_policy)
    add_audit_routes(app, core, audit_sink, digest_signer, respond, root_only)
    add_domain_routes(app, core, domain_rotator, peers, respond, root_only,
                      lambda request: request[_CALLER])
    return app
