"""The AWS JSON 1.1 protocol: `POST /` with `X-Amz-Target: TrentService.<Op>`.

One request goes: SigV4 verification → target routing → JSON parsing →
validation against the KMS service model → the service function from the
protocol table → a JSON answer. Errors are `{"__type", "message"}` with the
status their class carries; anything unexpected becomes KMSInternalException
with the request id, and its details stay in the log (never plaintext: the
log line names the operation and the exception type only).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from kmsd.api.operations import OPERATIONS
from kmsd.api.validation import RequestValidator
from kmsd.auth.credentials import CredentialStore
from kmsd.auth.sigv4 import SignedRequest, SigV4Verifier
from kmsd.errors import (
    KmsError,
    KMSInternalException,
    SerializationException,
    UnknownOperationException,
    UnsupportedOperationException,
)
from kmsd.service.context import Caller, RequestContext
from kmsd.service.core import ServiceCore

TARGET_PREFIX = "TrentService."
CONTENT_TYPE = "application/x-amz-json-1.1"
_ACCEPTED_CONTENT_TYPES = frozenset({CONTENT_TYPE, "application/json"})

log = structlog.get_logger("kmsd.api")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def json_response(body: dict[str, Any], request_id: str, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(_jsonable(body), separators=(",", ":")).encode(),
                        status=status, content_type=CONTENT_TYPE,
                        headers={"x-amzn-RequestId": request_id})


def error_response(error: KmsError, request_id: str) -> web.Response:
    return json_response(error.to_body(), request_id, error.http_status)


def signed_request(request: web.Request, body: bytes) -> SignedRequest:
    return SignedRequest(method=request.method, path=request.raw_path.split("?", 1)[0],
                         query_string=request.query_string,
                         headers=tuple((name.decode("latin-1"), value.decode("utf-8", "replace"))
                                        for name, value in request.raw_headers),
                         body=body)


class Authenticator:
    """SigV4 against the replicated access keys."""

    def __init__(self, verifier: SigV4Verifier, credentials: CredentialStore) -> None:
        self.verifier = verifier
        self.credentials = credentials

    def authenticate(self, request: web.Request, body: bytes) -> tuple[Caller, str]:
        verified = self.verifier.verify(signed_request(request, body),
                                        self.credentials.secret_for)
        return self.credentials.caller_for(verified.access_key_id), verified.region


class KmsProtocol:
    def __init__(self, core: ServiceCore, authenticator: Authenticator,
                 validator: RequestValidator, is_ready: Callable[[], str | None]) -> None:
        self.core = core
        self.authenticator = authenticator
        self.validator = validator
        # Returns None when the node may serve, else why it may not.
        self.is_ready = is_ready

    async def handle(self, request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        started = time.perf_counter()
        target = request.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX):] if target.startswith(TARGET_PREFIX) else ""
        structlog.contextvars.bind_contextvars(request_id=request_id)
        outcome = "ok"
        try:
            response = json_response(await self._serve(request, request_id, operation),
                                     request_id)
        except KmsError as error:
            outcome = error.error_type
            response = error_response(error, request_id)
        except Exception as exc:  # a bug: answer opaquely, keep the type in the log
            outcome = "KMSInternalException"
            log.error("request_failed", operation=operation, exc_type=type(exc).__name__,
                      exc_info=True)
            response = error_response(KMSInternalException(
                f"An internal error occurred (request id {request_id})."), request_id)
        log.info("request", operation=operation or target[:64], outcome=outcome,
                 status=response.status, ms=round((time.perf_counter() - started) * 1000, 3),
                 source_ip=request.remote)
        structlog.contextvars.unbind_contextvars("request_id")
        return response

    async def _serve(self, request: web.Request, request_id: str,
                     operation: str) -> dict[str, Any]:
        body = await request.read()
        caller, region = self.authenticator.authenticate(request, body)
        if request.method != "POST" or operation not in self.validator.operation_names:
            raise UnknownOperationException()
        content_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type not in _ACCEPTED_CONTENT_TYPES:
            raise SerializationException(f"Unsupported content type {content_type!r}.")
        try:
            raw = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise SerializationException("The request body is not valid JSON.") from None
        params = self.validator.validate(operation, raw)
        handler = OPERATIONS.get(operation)
        if handler is None:
            raise UnsupportedOperationException(f"kmsd does not implement {operation} yet.")
        not_ready = self.is_ready()
        if not_ready is not None:
            raise KMSInternalException(not_ready)
        context = RequestContext(request_id=request_id, region=region, caller=caller,
                                 source_ip=request.remote or "",
                                 user_agent=request.headers.get("User-Agent", ""))
        return await handler(self.core, context, params)
