"""The API port's server: the KMS protocol on every path, and the node's health, readiness
and metrics beside it. Served by a node's primary, or by each of its API workers
(kmsd.api_workers), which ask the primary for readiness and metrics.

A low-level aiohttp server with its own three-way dispatch, not an Application: the KMS
protocol answers every path and method itself, so a router, its match info and the
application's handler chain were work done per request for nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11

from kmsd.api.protocol import MAX_BODY_BYTES
from kmsd.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def make_api_server(handle: Handler,
                    readiness: Callable[[], Awaitable[tuple[int, dict[str, Any]]]],
                    render_metrics: Callable[[], Awaitable[bytes | None]]) -> web.Server:
    """`readiness` gives /readyz's (status, body); `render_metrics` the Prometheus text, or
    None when it cannot be had (503). Call it on the event loop that will serve it."""

    async def healthz(_request: web.BaseRequest) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_request: web.BaseRequest) -> web.Response:
        status, body = await readiness()
        return web.json_response(body, status=status)

    async def metrics(_request: web.BaseRequest) -> web.Response:
        rendered = await render_metrics()
        if rendered is None:
            return web.Response(status=503, text="metrics unavailable\n")
        return web.Response(body=rendered, headers={"Content-Type": METRICS_CONTENT_TYPE})

    node_paths: dict[str, Handler] = {"/healthz": healthz, "/readyz": readyz,
                                      "/metrics": metrics}

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        if request.method in ("GET", "HEAD"):
            node_path = node_paths.get(request.path)
            if node_path is not None:
                return await node_path(request)
        if "Expect" in request.headers:
            await _expect(request)
        return await handle(request)

    loop = asyncio.get_running_loop()

    def make_request(message: Any, payload: Any, protocol: Any, writer: Any,
                     task: Any) -> web.BaseRequest:
        return web.BaseRequest(message, payload, protocol, writer, task, loop,
                               client_max_size=MAX_BODY_BYTES)

    return web.Server(dispatch, request_factory=make_request, access_log=None)


async def _expect(request: web.BaseRequest) -> None:
    """What an aiohttp Application does with an Expect header: "100 Continue" before the
    body is read, 417 for any other expectation."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0
    await request.writer.drain()
