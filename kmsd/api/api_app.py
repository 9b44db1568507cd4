"""The API port's application: the KMS protocol on every path, and the node's health,
readiness and metrics beside it. Served by a node's primary, or by each of its API workers
(kmsd.api_workers), which ask the primary for readiness and metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kmsd.api.protocol import MAX_BODY_BYTES
from kmsd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_api_app(handle: Handler,
                 readiness: Callable[[], Awaitable[tuple[int, dict[str, Any]]]],
                 render_metrics: Callable[[], Awaitable[bytes | None]]) -> web.Application:
    """`readiness` gives /readyz's (status, body); `render_metrics` the Prometheus text, or
    None when it cannot be had (503)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_request: web.Request) -> web.Response:
        status, body = await readiness()
        return web.json_response(body, status=status)

    async def metrics(_request: web.Request) -> web.Response:
        rendered = await render_metrics()
        if rendered is None:
            return web.Response(status=503, text="metrics unavailable\n")
        return web.Response(body=rendered, headers={"Content-Type": METRICS_CONTENT_TYPE})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
