"""The API port's server (kmsd.api.api_app): the node's three GET paths, everything else to
the KMS protocol handler, Expect headers and the body limit as an aiohttp Application
gave them. A real server on 127.0.0.1, spoken to over a socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from kmsd.api.api_app import make_api_server
from kmsd.api.protocol import MAX_BODY_BYTES


class _Served:
    def __init__(self) -> None:
        self.kms_requests: list[tuple[str, str, int | str]] = []
        self.ready: tuple[int, dict[str, Any]] = (200, {"ready": True})
        self.metrics: bytes | None = b"kmsd_up 1\n"

    async def handle(self, request: web.BaseRequest) -> web.Response:
        try:
            size: int | str = len(await request.read())
        except web.HTTPRequestEntityTooLarge:
            size = "too large"
        self.kms_requests.append((request.method, request.path, size))
        return web.json_response({"kms": True})

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        return self.ready

    async def render_metrics(self) -> bytes | None:
        return self.metrics


def _serving(test: Callable[[_Served, int], Awaitable[None]]) -> None:
    async def main() -> None:
        served = _Served()
        runner = web.ServerRunner(make_api_server(served.handle, served.readiness,
                                                  served.render_metrics))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            await test(served, port)
        finally:
            await runner.cleanup()
    asyncio.run(main())


async def _exchange(port: int, head: str, body: bytes = b"",
                    wait_for_continue: bool = False) -> tuple[int, bytes, list[bytes]]:
    """Send one request; (status, body, interim status lines) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        interim: list[bytes] = []
        if wait_for_continue:
            interim.append(await asyncio.wait_for(reader.readline(), 5))
            await reader.readline()  # the blank line ending the interim answer
        writer.write(body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        while status_line.startswith(b"HTTP/1.1 100"):
            interim.append(status_line)
            await reader.readline()
            status_line = await reader.readline()
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        head_only = head.startswith("HEAD ")
        answer = await reader.readexactly(length) if length and not head_only else b""
        return int(status_line.split()[1]), answer, interim
    finally:
        writer.close()


def _post(path: str, body: bytes, *extra: str) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             *extra]
    return "\n".join(lines) + "\n"


def test_the_node_paths_answer_get_and_head() -> None:
    async def test(served: _Served, port: int) -> None:
        status, body, _ = await _exchange(port, "GET /healthz HTTP/1.1\nHost: x\n")
        assert (status, json.loads(body)) == (200, {"alive": True})
        status, body, _ = await _exchange(port, "HEAD /healthz HTTP/1.1\nHost: x\n")
        assert status == 200
        served.ready = (503, {"ready": False, "reason": "no leader"})
        status, body, _ = await _exchange(port, "GET /readyz HTTP/1.1\nHost: x\n")
        assert (status, json.loads(body)) == (503, {"ready": False, "reason": "no leader"})
        status, body, _ = await _exchange(port, "GET /metrics HTTP/1.1\nHost: x\n")
        assert (status, body) == (200, b"kmsd_up 1\n")
        served.metrics = None
        status, _, _ = await _exchange(port, "GET /metrics HTTP/1.1\nHost: x\n")
        assert status == 503
        assert served.kms_requests == []
    _serving(test)


def test_every_other_path_and_method_goes_to_the_kms_handler() -> None:
    async def test(served: _Served, port: int) -> None:
        for head in (_post("/", b"{}"), _post("/healthz", b"{}"), _post("/a/b?c=d", b"{}"),
                     "GET / HTTP/1.1\nHost: x\n", "PUT /metrics HTTP/1.1\nHost: x\n"
                     "Content-Length: 0\n", "GET /healthz/ HTTP/1.1\nHost: x\n"):
            status, body, _ = await _exchange(port, head, b"{}" if head.startswith("POST")
                                              else b"")
            assert (status, json.loads(body)) == (200, {"kms": True}), head
        assert served.kms_requests == [
            ("POST", "/", 2), ("POST", "/healthz", 2), ("POST", "/a/b", 2), ("GET", "/", 0),
            ("PUT", "/metrics", 0), ("GET", "/healthz/", 0)]
    _serving(test)


def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async def test(served: _Served, port: int) -> None:
        status, _, interim = await _exchange(
            port, _post("/", b'{"a":1}', "Expect: 100-continue"), b'{"a":1}',
            wait_for_continue=True)
        assert interim == [b"HTTP/1.1 100 Continue\r\n"]
        assert status == 200
        assert served.kms_requests == [("POST", "/", 7)]
    _serving(test)


def test_an_unknown_expectation_fails_and_reaches_no_handler() -> None:
    async def test(served: _Served, port: int) -> None:
        status, body, _ = await _exchange(port, _post("/", b"{}", "Expect: teapot"), b"{}")
        assert status == 417
        assert b"Unknown Expect: teapot" in body
        assert served.kms_requests == []
    _serving(test)


def test_a_body_over_the_limit_is_refused_on_reading() -> None:
    async def test(served: _Served, port: int) -> None:
        body = b"x" * (MAX_BODY_BYTES + 1)
        status, _, _ = await _exchange(port, _post("/", body), body)
        assert status == 200
        await _exchange(port, _post("/", b"x" * MAX_BODY_BYTES), b"x" * MAX_BODY_BYTES)
        assert served.kms_requests == [("POST", "/", "too large"),
                                       ("POST", "/", MAX_BODY_BYTES)]
    _serving(test)
