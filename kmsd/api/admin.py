"""The admin API that kmsctl talks to: a separate port, the same SigV4 credentials.

Routes:
    GET /v1/node/status       this node: role, term, indexes, HSM token, domain key
    GET /v1/cluster/members   the members recorded in the replicated state
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kmsd.api.protocol import Authenticator, error_response, json_response
from kmsd.errors import KmsError

StatusSource = Callable[[], dict[str, Any]]


def make_admin_app(authenticator: Authenticator, node_status: StatusSource,
                   members: Callable[[], list[Any]]) -> web.Application:
    @web.middleware
    async def authenticate(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        try:
            authenticator.authenticate(request, await request.read())
        except KmsError as error:
            return error_response(error, request_id)
        return await handler(request)

    async def status(_request: web.Request) -> web.Response:
        return json_response(node_status(), str(uuid.uuid4()))

    async def cluster_members(_request: web.Request) -> web.Response:
        return json_response({"members": [dataclasses.asdict(m) for m in members()]},
                             str(uuid.uuid4()))

    app = web.Application(middlewares=[authenticate])
    app.router.add_get("/v1/node/status", status)
    app.router.add_get("/v1/cluster/members", cluster_members)
    return app
