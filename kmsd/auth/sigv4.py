"""AWS Signature Version 4 verification of header-signed requests.

This module owns the whole SigV4 check for the JSON 1.1 API: parsing the
Authorization header, validating the credential scope and the clock skew,
rebuilding the canonical request exactly as botocore signs it for non-S3
services, and comparing signatures in constant time. It also caches derived
signing keys so the four-step HMAC chain runs once per key, day and region.

It is pure: it never does I/O, never logs, and never returns or puts into an
exception message a secret access key, a derived key or a signature. Secrets
come from the `lookup_secret` callable for the duration of one call, and the
caller decides what an authenticated access key id is allowed to do.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Protocol
from urllib.parse import quote, unquote_plus

from kmsd.errors import (
    IncompleteSignatureException,
    InvalidSignatureException,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)

ALGORITHM = "AWS4-HMAC-SHA256"
_TERMINATOR = "aws4_request"
_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AMZ_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_PARAMS = ("Credential", "Signature", "SignedHeaders")  # AWS reports them in this order
# The Authorization header exactly as botocore writes it. What this matches, the general
# parser reads the same way (one algorithm, the three parameters once each, non-empty,
# nothing to strip); it is only faster. Anything else goes to the general parser.
_BOTOCORE_AUTHORIZATION = re.compile(
    ALGORITHM + r" Credential=([^\s,]+), SignedHeaders=([^\s,]+), Signature=([^\s,]+)")
_MAX_ECHO = 256  # bounds what a hostile header can make us echo into an error body
_CACHE_SIZE = 1024
_MISMATCH = ("The request signature we calculated does not match the signature you provided. "
             "Check your AWS Secret Access Key and signing method. "
             "Consult the service documentation for details.")


class HeaderLookup(Protocol):
    """Every value of a header by case-insensitive name, as aiohttp's CIMultiDictProxy
    gives them (names are HTTP tokens there, so no whitespace to strip)."""

    def getall(self, key: str, default: list[str], /) -> list[str]: ...


@dataclass(frozen=True)
class SignedRequest:
    method: str
    path: str
    query_string: str
    # (name, value) pairs as received, or a case-insensitive lookup of them: a server
    # passes its parsed headers, so only the few the check reads are looked at.
    headers: Sequence[tuple[str, str]] | HeaderLookup
    body: bytes


@dataclass(frozen=True)
class VerifiedCaller:
    access_key_id: str
    region: str
    signed_at: datetime


def derive_signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """The SigV4 signing key for one secret and credential scope."""
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, _TERMINATOR):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


_IPAD = bytes(x ^ 0x36 for x in range(256))  # translation tables: XOR every byte
_OPAD = bytes(x ^ 0x5C for x in range(256))


class SigningMac:
    """HMAC-SHA256 under one signing key, with the padded key's two hash states computed
    once (RFC 2104), so a signature costs two copies and two short updates.

    hmac.digest, the one-shot alternative, releases the GIL around OpenSSL's HMAC: under
    load every request then waits to win the GIL back from the node's other threads.
    hashlib holds the GIL for inputs under 2 KiB, which a string to sign always is.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        block_size = hashlib.sha256().block_size
        if len(key) > block_size:
            key = hashlib.sha256(key).digest()
        block = key.ljust(block_size, b"\0")
        self._inner = hashlib.sha256(block.translate(_IPAD))
        self._outer = hashlib.sha256(block.translate(_OPAD))

    def hexdigest(self, message: bytes) -> str:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def _utf8(text: str) -> bytes:
    # surrogatepass: headers and paths decoded with surrogateescape must give a
    # mismatch, not an encoding error that would surface as an internal error.
    return text.encode("utf-8", "surrogatepass")


def _uri_encode(text: str, safe: str) -> str:
    return quote(_utf8(text), safe=safe)


def canonical_path(path: str) -> str:
    """The path as botocore signs it for non-S3 services.

    Dot segments and empty segments are removed, then the already
    percent-encoded path is encoded once more: non-S3 SigV4 double-encodes.
    """
    if path == "/":  # every KMS request: nothing to remove or encode
        return path
    segments: list[str] = []
    for seg in path.split("/"):
        if seg == "..":
            if segments:
                segments.pop()
        elif seg and seg != ".":
            segments.append(seg)
    trailing = "/" if path.endswith("/") and segments else ""
    return _uri_encode("/" + "/".join(segments) + trailing, safe="/~")


def canonical_query(query_string: str) -> str:
    """The canonical query string: decoded, RFC 3986 re-encoded, sorted by name then value.

    '+' decodes as a space, as botocore's urlencode-built query strings mean it.
    """
    if not query_string:  # every KMS request
        return ""
    pairs = []
    for item in query_string.split("&"):
        if item:
            name, _, value = item.partition("=")
            pairs.append((_uri_encode(unquote_plus(name), safe="-_.~"),
                          _uri_encode(unquote_plus(value), safe="-_.~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _trimall(value: str) -> str:
    # str.split() rather than a regex on spaces: botocore collapses every
    # kind of whitespace (tabs included), and we must hash what it hashed.
    return " ".join(value.split())


def _header_values(headers: Sequence[tuple[str, str]] | HeaderLookup
                   ) -> Callable[[str], Sequence[str]]:
    """Every value of a header by lower-case name, in the order received."""
    if not isinstance(headers, Sequence):
        return lambda name: headers.getall(name, [])
    index: dict[str, list[str]] = {}
    for name, value in headers:
        index.setdefault(name.strip().lower(), []).append(value)
    return lambda name: index.get(name, [])


@lru_cache(maxsize=256)
def _parse_amz_date(raw: str) -> datetime:
    """An X-Amz-Date value as a UTC datetime; ValueError if it is not one.

    Cached: the requests of one second all carry the same value.
    """
    if not _AMZ_DATE_RE.fullmatch(raw):
        raise ValueError(raw)
    # Fixed-width digits, so datetime's range checks refuse exactly what
    # strptime(_AMZ_DATE_FORMAT) would, several times faster.
    return datetime(int(raw[0:4]), int(raw[4:6]), int(raw[6:8]), int(raw[9:11]),
                    int(raw[11:13]), int(raw[13:15]), tzinfo=UTC)


def _echo(value: str) -> str:
    return value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "..."


def _authorization_echo(params: dict[str, str]) -> str:
    # Rebuilt from parsed values so the signature can never leak into an error; built
    # only for an error, as most requests never need it.
    return f"Authorization={ALGORITHM} " + _echo(", ".join(
        f"{n}={params[n]}" for n in ("Credential", "SignedHeaders") if n in params))


def _format_skew(seconds: int) -> str:
    return f"{seconds // 60} min." if seconds % 60 == 0 else f"{seconds} sec."


class SigV4Verifier:
    """Verifies SigV4 header signatures for one service and a set of regions."""

    def __init__(self, service: str, regions: frozenset[str],
                 clock: Callable[[], float] = time.time, max_skew_seconds: int = 300) -> None:
        self._service = service
        self._regions = regions
        self._clock = clock
        self._max_skew = max_skew_seconds
        self._macs: dict[tuple[str, str, str, str], SigningMac] = {}

    def verify(self, request: SignedRequest,
               lookup_secret: Callable[[str], str | None]) -> VerifiedCaller:
        """The caller of a correctly signed request; raises the AWS error otherwise."""
        values = _header_values(request.headers)
        authorization = values("authorization")
        if not authorization:
            raise MissingAuthenticationTokenException("Missing Authentication Token")
        params = self._parse_authorization(",".join(authorization))

        scope = params["Credential"].split("/")
        if len(scope) != 5 or not all(scope):
            raise IncompleteSignatureException(
                "Credential must have exactly 5 slash-delimited elements, e.g. "
                f"keyid/date/region/service/term, got '{_echo(params['Credential'])}'")
        access_key_id, scope_date, region, service, terminator = scope
        signed_names = params["SignedHeaders"].lower().split(";")
        if not all(signed_names):
            raise IncompleteSignatureException(
                f"SignedHeaders is malformed. {_authorization_echo(params)}")
        if "host" not in signed_names:
            raise IncompleteSignatureException(
                "'Host' must be a 'SignedHeader' in the AWS Authorization. "
                f"{_authorization_echo(params)}")
        amz_date, signed_at, date_source = self._signing_time(values, params)

        if terminator != _TERMINATOR:
            raise InvalidSignatureException(
                f"Credential should be scoped with a valid terminator: '{_TERMINATOR}', "
                f"not '{_echo(terminator)}'. ")
        if service != self._service:
            raise InvalidSignatureException(
                f"Credential should be scoped to correct service: '{self._service}'. ")
        if region not in self._regions:
            raise InvalidSignatureException("Credential should be scoped to a valid region. ")
        if scope_date != amz_date[:8]:
            raise InvalidSignatureException(
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                f"from HTTP: '{_echo(scope_date)}' != '{amz_date[:8]}', "
                f"from '{_echo(date_source)}'.")
        self._check_skew(signed_at)

        secret = lookup_secret(access_key_id)
        if secret is None:
            raise UnrecognizedClientException(
                "The security token included in the request is invalid.")

        body_hash = hashlib.sha256(request.body).hexdigest()
        if "x-amz-content-sha256" in signed_names and \
                _trimall(",".join(values("x-amz-content-sha256"))) != body_hash:
            raise InvalidSignatureException(
                "The provided 'x-amz-content-sha256' header does not match what was computed.")
        # Only the signed headers are looked up and canonicalised, whatever else was sent.
        names = sorted(set(signed_names))
        canonical_request = "\n".join([
            request.method.upper(),
            canonical_path(request.path),
            canonical_query(request.query_string),
            "".join([f"{n}:{','.join(map(_trimall, values(n)))}\n" for n in names]),
            ";".join(names),
            body_hash,
        ])
        string_to_sign = "\n".join([
            ALGORITHM, amz_date, f"{scope_date}/{region}/{service}/{_TERMINATOR}",
            hashlib.sha256(_utf8(canonical_request)).hexdigest(),
        ])
        expected = self._signing_mac(secret, scope_date, region, service).hexdigest(
            string_to_sign.encode())
        if not hmac.compare_digest(expected.encode(), _utf8(params["Signature"])):
            raise InvalidSignatureException(_MISMATCH)
        return VerifiedCaller(access_key_id=access_key_id, region=region, signed_at=signed_at)

    @staticmethod
    def _parse_authorization(header: str) -> dict[str, str]:
        """The Credential/SignedHeaders/Signature parameters of the Authorization header."""
        if m := _BOTOCORE_AUTHORIZATION.fullmatch(header):
            return {"Credential": m[1], "SignedHeaders": m[2], "Signature": m[3]}
        algorithm, _, rest = header.strip().replace("\t", " ").partition(" ")
        if algorithm != ALGORITHM:
            raise IncompleteSignatureException(
                f"Unsupported AWS 'algorithm': '{_echo(algorithm)}'")
        params: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name not in _PARAMS or name in params:
                # Echo nothing: an unparsed component may well be the signature.
                raise IncompleteSignatureException(
                    "Authorization header is malformed: expected 'Credential=..., "
                    "SignedHeaders=..., Signature=...'.")
            params[name] = value.strip()
        missing = [f"Authorization header requires '{n}' parameter. "
                   for n in _PARAMS if not params.get(n)]
        if missing:
            raise IncompleteSignatureException("".join(missing) + _authorization_echo(params))
        return params

    @staticmethod
    def _signing_time(values: Callable[[str], Sequence[str]], params: dict[str, str]
                      ) -> tuple[str, datetime, str]:
        """The ISO-8601 basic timestamp that was signed, as text and datetime, and its source."""
        amz_dates = values("x-amz-date")
        if amz_dates:
            raw = ",".join(amz_dates).strip()
            try:
                signed_at = _parse_amz_date(raw)
            except ValueError:
                raise IncompleteSignatureException(
                    f"Date must be in ISO-8601 'basic format'. Got '{_echo(raw)}'. "
                    "See http://en.wikipedia.org/wiki/ISO_8601") from None
            return raw, signed_at, raw
        dates = values("date")
        if dates:
            raw = ",".join(dates).strip()
            try:
                parsed = parsedate_to_datetime(raw)
                # botocore sends "-0000", which parsedate_to_datetime leaves naive: it means UTC.
                signed_at = (parsed.replace(tzinfo=UTC) if parsed.tzinfo is None
                             else parsed.astimezone(UTC))
            except (TypeError, ValueError, OverflowError):
                raise IncompleteSignatureException(
                    f"Date must be in RFC 1123 format. Got '{_echo(raw)}'.") from None
            return signed_at.strftime(_AMZ_DATE_FORMAT), signed_at, raw
        raise IncompleteSignatureException(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' "
            f"header. {_authorization_echo(params)}")

    def _check_skew(self, signed_at: datetime) -> None:
        now = self._clock()
        skew = signed_at.timestamp() - now
        if abs(skew) <= self._max_skew:
            return
        now_dt = datetime.fromtimestamp(int(now), UTC)
        fmt = _AMZ_DATE_FORMAT
        signed, current = signed_at.strftime(fmt), now_dt.strftime(fmt)
        window = _format_skew(self._max_skew)
        if skew < 0:
            bound = datetime.fromtimestamp(int(now) - self._max_skew, UTC).strftime(fmt)
            raise InvalidSignatureException(
                f"Signature expired: {signed} is now earlier than {bound} "
                f"({current} - {window})")
        bound = datetime.fromtimestamp(int(now) + self._max_skew, UTC).strftime(fmt)
        raise InvalidSignatureException(
            f"Signature not yet current: {signed} is still later than {bound} "
            f"({current} + {window})")

    def _signing_mac(self, secret: str, date: str, region: str, service: str) -> SigningMac:
        cache_key = (secret, date, region, service)
        mac = self._macs.get(cache_key)
        if mac is None:
            mac = SigningMac(derive_signing_key(secret, date, region, service))
            if len(self._macs) >= _CACHE_SIZE:
                # Insertion order makes the first entry the oldest; pop with a
                # default so two threads evicting the same entry cannot fail.
                self._macs.pop(next(iter(self._macs)), None)
            self._macs[cache_key] = mac
        return mac
