"""Admin routes of domain-key rotation (kmsd.service.domain_rotation).

    GET  /v1/domain                              generations, blobs per generation, what
                                                 each member's token holds (kmsctl domain status)
    POST /v1/domain/rotate                       request a rotation (kmsctl domain rotate);
                                                 any node: it goes through Raft to the leader

Member to member (peer HMAC, see kmsd/api/admin.py; a body is bound by body_sha256):
    GET  /v1/internal/domain/held                generation -> check value in this token, and
                                                 the active generation this node has applied
    POST /v1/internal/domain/transport?generation=N   make a transport key for generation N
    POST /v1/internal/domain/accept?generation=N      unwrap generation N sent by the leader
    POST /v1/internal/domain/sync                destroy retired generations in this token

Root only (the public routes). A rotation request is recorded in the audit chain before it
takes effect, with the caller's identity; the leader records each step after it
(kmsd.audit.domain_events).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from aiohttp import web

from kmsd.errors import AccessDeniedException, ValidationException
from kmsd.service import domain_members
from kmsd.service.core import ServiceCore
from kmsd.service.domain_rotation import (
    DomainRotator,
    PeerClient,
    body_matches,
    cluster_status,
    held_as_json,
    request_rotation,
)


def _generation(request: web.Request) -> int:
    value = request.query.get("generation", "")
    if not value.isdigit() or int(value) < 1:
        raise ValidationException("generation must be a positive integer.")
    return int(value)


def add_domain_routes(app: web.Application, core: ServiceCore, rotator: DomainRotator,
                      peers: PeerClient, respond: Any, root_only: Any,
                      caller_of: Any) -> None:
    async def status(request: web.Request) -> web.Response:
        root_only(request)
        return respond(await cluster_status(core, peers, rotator))

    async def rotate(request: web.Request) -> web.Response:
        root_only(request)
        started = await request_rotation(core, rotator.audit, caller_of(request),
                                         peers.node_id, str(uuid.uuid4()))
        return respond({"Started": started, **await cluster_status(core, peers, rotator)})

    async def held(_request: web.Request) -> web.Response:
        return respond({"Held": held_as_json(core.hsm.held_generations()),
                        "ActiveGeneration": core.state.active_generation})

    async def transport(request: web.Request) -> web.Response:
        point = await domain_members.transport_point(core, _generation(request))
        return respond({"TransportPoint": point.hex()})

    async def accept(request: web.Request) -> web.Response:
        body = await request.read()
        if not body_matches(request.query.get("body_sha256"), body):
            raise AccessDeniedException("Peer authentication failed.")
        try:
            fields = json.loads(body)
            donor_point = bytes.fromhex(fields["DonorPoint"])
            wrapped = bytes.fromhex(fields["WrappedDomainKey"])
        except (ValueError, KeyError, TypeError):
            raise ValidationException("Expected DonorPoint and WrappedDomainKey (hex).") from None
        check = await domain_members.accept(core, _generation(request), donor_point, wrapped)
        return respond({"Check": check})

    async def sync(_request: web.Request) -> web.Response:
        return respond({"Held": held_as_json(domain_members.reconcile(
            dict(core.state.domain_generations), core.hsm))})

    app.router.add_get("/v1/domain", status)
    app.router.add_post("/v1/domain/rotate", rotate)
    app.router.add_get("/v1/internal/domain/held", held)
    app.router.add_post("/v1/internal/domain/transport", transport)
    app.router.add_post("/v1/internal/domain/accept", accept)
    app.router.add_post("/v1/internal/domain/sync", sync)
