"""Admin routes over this node's audit segments: verify, records (for tail), export.

    GET /v1/audit/verify                    the whole chain against the replicated head
    GET /v1/audit/records?after=N&limit=M   records after seq N (kmsctl audit tail)
    GET /v1/audit/export?since=&until=&event=   JSONL, one CloudTrail-shaped event a line
    POST /v1/audit/digest                   sign the chain head now (a signed digest record)
    GET /v1/audit/public-key                the digest signing key (DER SPKI, base64)

File reads run in a worker thread, never on the event loop. Root only.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import itertools
from datetime import datetime
from typing import Any

from aiohttp import web

from kmsd.audit import digests
from kmsd.audit.digest_signer import DigestSigner
from kmsd.audit.digests import check_digests
from kmsd.audit.segments import export_jsonl, read_records, verify_directory
from kmsd.audit.sink import SegmentSink
from kmsd.errors import NotFoundException, ValidationException
from kmsd.service.core import ServiceCore


def _parse_time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationException(f"{name} must be an ISO-8601 time, got {value!r}.") from None


def _int(value: str | None, name: str, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit():
        raise ValidationException(f"{name} must be a non-negative integer.")
    return int(value)


def add_audit_routes(app: web.Application, core: ServiceCore, sink: SegmentSink,
                     signer: DigestSigner, respond: Any, root_only: Any) -> None:
    async def off_loop(function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def verify(request: web.Request) -> web.Response:
        root_only(request)
        head = core.state.audit.head
        await off_loop(sink.wait_for, head.seq)
        result = await off_loop(lambda: verify_directory(sink.directory, expected_head=head))
        signing = core.state.audit_signing_key
        checked = (await off_loop(lambda: check_digests(read_records(sink.directory),
                                                        signing[1]))
                   if signing and result.ok else None)
        return respond({
            "ok": result.ok and sink.gap is None and (checked is None or checked.ok),
            "records": result.records,
            "digests": dataclasses.asdict(checked) if checked else None,
            "head": dataclasses.asdict(result.head),
            "expected_head": dataclasses.asdict(head),
            "error": dataclasses.asdict(result.error) if result.error else None,
            "torn": dataclasses.asdict(result.torn) if result.torn else None,
            "segment_gap": sink.gap})

    async def records(request: web.Request) -> web.Response:
        if not request.path.startswith("/v1/internal/"):
            root_only(request)
        after = _int(request.query.get("after"), "after", 0)
        limit = min(_int(request.query.get("limit"), "limit", 100), 1000)

        def collect() -> list[dict[str, Any]]:
            return [{"seq": r.seq, "hash": r.hash, "prev_hash": r.prev_hash, "node": r.node,
                     "revoked": r.revoked, "event": r.event}
                    for r in itertools.islice(read_records(sink.directory, after), limit)]

        return respond({"Records": await off_loop(collect)})

    async def export(request: web.Request) -> web.StreamResponse:
        root_only(request)
        since = _parse_time(request.query.get("since"), "since")
        until = _parse_time(request.query.get("until"), "until")
        event = request.query.get("event") or None

        def render() -> bytes:
            out = io.StringIO()
            export_jsonl(sink.directory, out, since=since, until=until, event_name=event)
            return out.getvalue().encode()

        body = await off_loop(render)
        return web.Response(body=body, content_type="application/x-ndjson")

    async def sign_digest(request: web.Request) -> web.Response:
        root_only(request)
        record = await signer.sign_now()
        return respond({"seq": record.seq, "hash": record.hash})

    async def public_key(request: web.Request) -> web.Response:
        signing = core.state.audit_signing_key
        if signing is None:
            raise NotFoundException("No audit digest signing key exists yet.")
        return respond({"PublicKey": base64.b64encode(signing[1]).decode(),
                        "KeyId": digests.public_key_id(signing[1]),
                        "KeySpec": digests.KEY_SPEC,
                        "SigningAlgorithm": digests.ALGORITHM})

    app.router.add_get("/v1/audit/verify", verify)
    app.router.add_post("/v1/audit/digest", sign_digest)
    app.router.add_get("/v1/audit/public-key", public_key)
    app.router.add_get("/v1/audit/records", records)
    app.router.add_get("/v1/internal/audit/records", records)
    app.router.add_get("/v1/audit/export", export)
