"""Raw HTTP to a kmsd node, signed with botocore's SigV4 or deliberately not quite.

botocore's client would refuse to send most of what the fuzzer needs (malformed JSON,
wrong content types, bodies changed after signing), so requests are built by hand:
an AWSRequest signed by SigV4Auth (optionally at a chosen time, for another region
or service, or with other credentials), then sent with urllib. `Answer` is what came
back, parsed as far as it parses.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from botocore.auth import SIGV4_TIMESTAMP, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."


class SigV4At(SigV4Auth):
    """SigV4Auth signing as if the clock read `at`."""

    def __init__(self, credentials: Credentials, service: str, region: str,
                 at: datetime) -> None:
        super().__init__(credentials, service, region)
        self.at = at

    def add_auth(self, request: AWSRequest) -> None:
        request.context["timestamp"] = self.at.strftime(SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical_request = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical_request)
        self._inject_signature_to_request(request, self.signature(string_to_sign, request))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes
    body: Any = None
    request_id: str | None = None

    @property
    def error_type(self) -> str | None:
        return self.body.get("__type") if isinstance(self.body, dict) else None

    @property
    def message(self) -> Any:
        return self.body.get("message") if isinstance(self.body, dict) else None

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.raw[:300]!r}"


@dataclass
class Request:
    """One request to send; `sign` None sends it unsigned."""

    body: bytes
    target: str | None
    content_type: str | None = CONTENT_TYPE
    method: str = "POST"
    path: str = "/"
    region: str | None = None
    service: str = "kms"
    at: datetime | None = None
    credentials: Credentials | None = None
    sign: bool = True
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Applied to the signed headers before sending (drop or change one).
    tamper_headers: Callable[[dict[str, str]], dict[str, str]] | None = None
    # Sent instead of `body` after signing `body` (a replayed signature, a changed body).
    send_body: bytes | None = None


def send(endpoint: str, request: Request, credentials: Credentials, region: str,
         timeout: float = 30.0) -> Answer:
    url = endpoint + request.path
    headers = dict(request.extra_headers)
    if request.target is not None:
        headers["X-Amz-Target"] = request.target
    if request.content_type is not None:
        headers["Content-Type"] = request.content_type
    signed = AWSRequest(method=request.method, url=url, data=request.body, headers=headers)
    if request.sign:
        creds = request.credentials or credentials
        if request.at is not None:
            SigV4At(creds, request.service, request.region or region, request.at).add_auth(signed)
        else:
            SigV4Auth(creds, request.service, request.region or region).add_auth(signed)
    final = dict(signed.prepare().headers)
    if request.tamper_headers is not None:
        final = request.tamper_headers(final)
    body = request.send_body if request.send_body is not None else request.body
    if request.send_body is not None:
        # Content-Length is not signed: a replay carries the true length of what it sends.
        final = {k: v for k, v in final.items() if k.lower() != "content-length"}
        final["Content-Length"] = str(len(body))
    if request.content_type is None:
        # urllib adds a form content type to a POST that has none; send an empty one.
        final.setdefault("Content-Type", "")
    http = urllib.request.Request(url, data=body if body else None, headers=final,
                                  method=request.method)
    try:
        with urllib.request.urlopen(http, timeout=timeout) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), dict(error.headers)
    answer = Answer(status, {k.lower(): v for k, v in got.items()}, raw)
    answer.request_id = answer.headers.get("x-amzn-requestid")
    try:
        answer.body = json.loads(raw)
    except ValueError:
        answer.body = None
    return answer
