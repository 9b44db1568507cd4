"""The AWS JSON 1.1 protocol: `POST /` with `X-Amz-Target: TrentService.<Op>`.

One request goes: SigV4 verification → target routing → JSON parsing →
validation against the KMS service model → the service function from the
protocol table → a JSON answer. Errors are `{"__type", "message"}` with the
status their class carries; anything unexpected becomes KMSInternalException
with the request id, and its details stay in the log (never plaintext: the
log line names the operation and the exception type only).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from json.encoder import c_make_encoder, encode_basestring_ascii
from typing import Any

import structlog
from aiohttp import ClientPayloadError, web

from cluster.state import key_arn
from kmsd import log_setup
from kmsd.api.operations import OPERATIONS
from kmsd.api.validation import RequestValidator
from kmsd.audit.chain import ChainedRecord
from kmsd.audit.committer import AuditCommitter, AuditUnavailable
from kmsd.audit.record import encode_event
from kmsd.auth.credentials import CredentialStore
from kmsd.auth.sigv4 import SignedRequest, SigV4Verifier
from kmsd.errors import (
    KmsError,
    KMSInternalException,
    NotFoundException,
    SerializationException,
    UnknownOperationException,
    UnsupportedOperationException,
    ValidationException,
)
from kmsd.ids import new_uuid
from kmsd.service.context import Caller, RequestContext
from kmsd.service.core import ServiceCore

TARGET_PREFIX = "TrentService."
MAX_BODY_BYTES = 1024 * 1024
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False
CONTENT_TYPE = "application/x-amz-json-1.1"
_ACCEPTED_CONTENT_TYPES = frozenset({CONTENT_TYPE, "application/json"})

log = structlog.get_logger("kmsd.api")


def _jsonable(value: Any) -> Any:
    """Blobs are base64 text in the JSON protocol; the encoder asks only for those."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_encoder() -> Callable[[Any], str]:
    # One C encoder, built once: json.dumps builds one per call, which costs about as
    # much as encoding a response, and walking the body for blobs beforehand as much
    # again. Same output as json.dumps(separators=(",", ":")). No circular-reference
    # markers (a shared markers dict would keep stale entries after a failed encode):
    # a body is plain dicts and lists built per request.
    if c_make_encoder is None:  # an interpreter without the C accelerator
        return json.JSONEncoder(separators=(",", ":"), default=_jsonable).encode
    encode = c_make_encoder(None, _jsonable, encode_basestring_ascii, None, ":", ",",
                            False, False, True)
    return lambda body: "".join(encode(body, 0))


_encode = _make_encoder()


def json_response(body: dict[str, Any], request_id: str, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body).encode(), status=status, content_type=CONTENT_TYPE,
                        headers={"x-amzn-RequestId": request_id})


def error_response(error: KmsError, request_id: str) -> web.Response:
    return json_response(error.to_body(), request_id, error.http_status)


def signed_request(request: web.BaseRequest, body: bytes) -> SignedRequest:
    # The parsed headers as they are (a case-insensitive multidict): the verifier looks up
    # the few it needs instead of every header being copied and decoded per request.
    return SignedRequest(method=request.method, path=request.raw_path.split("?", 1)[0],
                         query_string=request.query_string, headers=request.headers,
                         body=body)


class Authenticator:
    """SigV4 against the replicated access keys."""

    def __init__(self, verifier: SigV4Verifier, credentials: CredentialStore) -> None:
        self.verifier = verifier
        self.credentials = credentials

    def authenticate(self, request: web.BaseRequest, body: bytes) -> tuple[Caller, str]:
        verified = self.verifier.verify(signed_request(request, body),
                                        self.credentials.secret_for)
        return self.credentials.caller_for(verified.access_key_id), verified.region


@dataclass
class _Exchange:
    """What is known of one request as it goes through the pipeline (for its audit record)."""

    request_id: str
    operation: str
    caller: Caller | None = None
    region: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    context: RequestContext | None = None


# Uses of a key whose decision is re-checked when the audit record commits.
REVOCABLE = frozenset({
    "Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext", "Sign", "Verify",
    "GenerateMac", "VerifyMac", "DeriveSharedSecret", "GetPublicKey"})


class KmsProtocol:
    def __init__(self, core: ServiceCore, authenticator: Authenticator,
                 validator: RequestValidator, is_ready: Callable[[], str | None],
                 audit: AuditCommitter, node_id: str,
                 on_request: Callable[[str, str, float], None] = lambda _o, _r, _s: None
                 ) -> None:
        self.core = core
        self.authenticator = authenticator
        self.validator = validator
        # Returns None when the node may serve, else why it may not.
        self.is_ready = is_ready
        self.audit = audit
        self.node_id = node_id
        # (operation, outcome, seconds) of every answered request; for metrics.
        self.on_request = on_request

    async def handle(self, request: web.BaseRequest) -> web.Response:
        started = time.perf_counter()
        target = request.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX):] if target.startswith(TARGET_PREFIX) else ""
        exchange = _Exchange(new_uuid(), operation)
        # For anything logged while serving; the access line below names it itself.
        request_id_token = log_setup.REQUEST_ID.set(exchange.request_id)
        body: dict[str, Any] | None = None
        error: KmsError | None = None
        try:
            body = await self._serve(request, exchange)
        except KmsError as kms_error:
            error = kms_error
        except Exception as exc:  # a bug: answer opaquely, keep the type in the log
            log.error("request_failed", operation=operation, exc_type=type(exc).__name__,
                      exc_info=True)
            error = KMSInternalException(
                f"An internal error occurred (request id {exchange.request_id}).")
        # Fail closed: nothing leaves this node before its audit record is committed.
        try:
            record = await self._record(request, exchange, body, error)
        except AuditUnavailable:
            body, error = None, KMSInternalException(
                "The request could not be recorded in the audit log (no quorum); retry it.")
        else:
            if record.revoked and error is None:
                body, error = None, self._revoked_error(exchange)
        response = (json_response(body, exchange.request_id) if error is None
                    else error_response(error, exchange.request_id))
        known = operation if operation in self.validator.operation_names else "Unknown"
        outcome = error.error_type if error else "ok"
        elapsed = time.perf_counter() - started
        self.on_request(known, outcome, elapsed)
        log_setup.info_line({
            "event": "request", "operation": operation or target[:64], "outcome": outcome,
            "status": response.status,
            "principal": exchange.caller.principal_arn if exchange.caller else None,
            "keys": [k for k, _ in exchange.context.decisions] if exchange.context else [],
            "ms": round(elapsed * 1000, 3), "source_ip": request.remote,
            "request_id": exchange.request_id})
        log_setup.REQUEST_ID.reset(request_id_token)
        return response

    async def _serve(self, request: web.BaseRequest, exchange: _Exchange) -> dict[str, Any]:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ValidationException(
                f"The request body exceeds {MAX_BODY_BYTES} bytes.") from None
        except (ConnectionError, asyncio.IncompleteReadError, ClientPayloadError):
            # The client went away mid-body: its doing, not an internal fault.
            raise SerializationException("The request body was cut short.") from None
        exchange.caller, exchange.region = self.authenticator.authenticate(request, body)
        operation = exchange.operation
        if request.method != "POST" or operation not in self.validator.operation_names:
            raise UnknownOperationException()
        content_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if content_type not in _ACCEPTED_CONTENT_TYPES:
            raise SerializationException(f"Unsupported content type {content_type!r}.")
        try:
            raw = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise SerializationException("The request body is not valid JSON.") from None
        except RecursionError:
            raise SerializationException("The request body nests too deeply.") from None
        if _SURROGATE_ESCAPE.search(body) and _has_lone_surrogate(raw):
            # Escapes that decode to half a UTF-16 pair are no text: refuse them here
            # rather than fail later when the value is encoded.
            raise SerializationException("The request body holds an invalid \\u escape.")
        params = self.validator.validate(operation, raw)
        exchange.params = params
        handler = OPERATIONS.get(operation)
        if handler is None:
            raise UnsupportedOperationException(f"kmsd does not implement {operation} yet.")
        not_ready = self.is_ready()
        if not_ready is not None:
            raise KMSInternalException(not_ready)
        exchange.context = RequestContext(
            request_id=exchange.request_id, region=exchange.region, caller=exchange.caller,
            source_ip=request.remote or "", user_agent=request.headers.get("User-Agent", ""),
            secure_transport=request.secure)
        return await handler(self.core, exchange.context, params)

    async def _record(self, request: web.BaseRequest, exchange: _Exchange,
                      body: dict[str, Any] | None, error: KmsError | None) -> ChainedRecord:
        caller = exchange.caller
        decisions = exchange.context.decisions if exchange.context else []
        keys = self.core.state.keys
        key_arns = [keys[k].arn for k, _ in decisions if k in keys]
        event_id, event_time = new_uuid(), time.time()
        # The event's canonical bytes, straight from the request (what
        # AuditEntry.of(build_event(...).to_dict()) would encode, at a fraction of the cost).
        event_time_text, event_bytes = encode_event(
            operation=exchange.operation or "UnknownOperation", params=exchange.params,
            response=body, error_code=error.error_type if error else None,
            error_message=error.message if error else None,
            principal_arn=caller.principal_arn if caller else "",
            account_id=caller.account_id if caller else self.core.account_id,
            access_key_id=caller.access_key_id if caller else "",
            region=exchange.region or self.core.regions[0],
            source_ip=request.remote or "", user_agent=request.headers.get("User-Agent", ""),
            request_id=exchange.request_id, event_id=event_id, event_time=event_time,
            key_arns=key_arns, recipient_account_id=self.core.account_id)
        revocable = exchange.operation in REVOCABLE
        usage: tuple[str, ...] = ()
        if revocable and error is None and decisions:
            usage = (decisions[0][0], exchange.operation, event_time_text, event_id,
                     exchange.request_id)
        return await self.audit.commit(
            (event_bytes, self.node_id, tuple(decisions) if revocable else (), usage))

    def _revoked_error(self, exchange: _Exchange) -> KmsError:
        """The error the state at the audit record's log position implies for this request."""
        assert exchange.context is not None
        fresh = dataclasses.replace(exchange.context, decisions=[])
        for operation, key_id in exchange.context.authorized:
            record = self.core.state.keys.get(key_id)
            if record is None:
                arn = key_arn(exchange.region, self.core.account_id, key_id)
                return NotFoundException(f"Key '{arn}' does not exist")
            try:
                self.core.require_usable(record)
                self.core.authorizer.check(fresh, operation, record, exchange.params)
            except KmsError as kms_error:
                return kms_error
        return KMSInternalException("The key changed while the request was served; retry it.")
