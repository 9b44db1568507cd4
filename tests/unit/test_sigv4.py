"""SigV4 verification against requests signed by botocore itself."""

from __future__ import annotations

import calendar
import hashlib
import hmac
import json
import re
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock
from urllib.parse import urlencode, urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsd.auth import sigv4
from kmsd.auth.sigv4 import SignedRequest, SigV4Verifier, VerifiedCaller
from kmsd.errors import (
    IncompleteSignatureException,
    InvalidSignatureException,
    KmsError,
    MissingAuthenticationTokenException,
    UnrecognizedClientException,
)

AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SIGNED_AT = datetime(2026, 1, 1, 0, 10, 0)  # botocore works in naive UTC
NOW = float(calendar.timegm(SIGNED_AT.timetuple()))
URL = "https://kms.us-east-1.amazonaws.com/"
BODY = json.dumps({"KeyId": "alias/test", "Plaintext": "aGVsbG8="}).encode()
MISMATCH = ("The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. "
            "Consult the service documentation for details.")


def sign(*, body: bytes = BODY, url: str = URL, params: Any = None,
         headers: dict[str, str] | None = None, target: str = "TrentService.Encrypt",
         ak: str = AK, sk: str = SK, token: str | None = None, region: str = "us-east-1",
         service: str = "kms", when: datetime = SIGNED_AT) -> SignedRequest:
    """A request as botocore signs and sends it, seen as the server receives it."""
    all_headers = {"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1",
                   **(headers or {})}
    request = AWSRequest(method="POST", url=url, data=body, headers=all_headers, params=params)
    with mock.patch("botocore.auth.get_current_datetime", return_value=when):
        SigV4Auth(Credentials(ak, sk, token), service, region).add_auth(request)
    prepared = request.prepare()
    parts = urlsplit(prepared.url)
    # The HTTP client adds Host after signing; botocore signed the URL's host.
    received = [("Host", parts.netloc), *prepared.headers.items()]
    return SignedRequest(method=prepared.method, path=parts.path, query_string=parts.query,
                         headers=received, body=prepared.body or b"")


def verifier(now: float = NOW, **kwargs: Any) -> SigV4Verifier:
    return SigV4Verifier("kms", frozenset({"us-east-1", "eu-west-1"}), clock=lambda: now,
                         **kwargs)


def secrets(ak: str) -> str | None:
    return {AK: SK, "AKIDOTHER": "other-secret"}.get(ak)


def replace_header(request: SignedRequest, name: str, value: str | None) -> SignedRequest:
    """The request with header `name` set to `value` (removed if None)."""
    kept = [(n, v) for n, v in request.headers if n.lower() != name.lower()]
    added = [] if value is None else [(name, value)]
    return SignedRequest(request.method, request.path, request.query_string, kept + added,
                         request.body)


def header(request: SignedRequest, name: str) -> str:
    return next((v for n, v in request.headers if n.lower() == name.lower()), "")


def with_body(request: SignedRequest, body: bytes) -> SignedRequest:
    return SignedRequest(request.method, request.path, request.query_string, request.headers,
                         body)


def raises(exc: type[KmsError], request: SignedRequest, *, now: float = NOW,
           lookup: Callable[[str], str | None] = secrets) -> KmsError:
    with pytest.raises(exc) as info:
        verifier(now).verify(request, lookup)
    signature = re.search(r"Signature=([0-9a-f]+)", header(request, "Authorization"))
    if signature:
        assert signature.group(1) not in info.value.message
    return info.value


# -- valid requests ---------------------------------------------------------------------------

def test_valid_request_verifies() -> None:
    caller = verifier().verify(sign(), secrets)
    assert caller == VerifiedCaller(AK, "us-east-1", SIGNED_AT.replace(tzinfo=UTC))


def test_other_allowed_region_verifies() -> None:
    assert verifier().verify(sign(region="eu-west-1"), secrets).region == "eu-west-1"


def test_empty_body_verifies() -> None:
    assert verifier().verify(sign(body=b""), secrets).access_key_id == AK


def test_session_token_request_verifies() -> None:
    request = sign(token="FwoGZXIvYXdzEBYaDFAKE+TOKEN/==")
    assert "x-amz-security-token" in header(request, "Authorization")
    assert verifier().verify(request, secrets).access_key_id == AK
    tampered = replace_header(request, "X-Amz-Security-Token", "FwoGZXIvYXdzEBYaDOTHER")
    assert raises(InvalidSignatureException, tampered).message == MISMATCH


def test_date_header_instead_of_x_amz_date_verifies() -> None:
    request = sign(headers={"Date": "placeholder, botocore rewrites it"})
    # formatdate() without usegmt: "-0000", which parsedate_to_datetime leaves naive.
    assert header(request, "Date") == "Thu, 01 Jan 2026 00:10:00 -0000"
    assert not any(n.lower() == "x-amz-date" for n, _ in request.headers)
    assert verifier().verify(request, secrets).signed_at == SIGNED_AT.replace(tzinfo=UTC)


def test_mixed_case_names_and_extra_spaces_verify() -> None:
    request = sign(headers={"X-Custom-Value": "  a   lot    of\tspace  "})
    swapped = [(n.swapcase(), v) for n, v in request.headers]
    respaced = replace_header(SignedRequest(request.method, request.path, request.query_string,
                                            swapped, request.body),
                              "x-CUSTOM-value", "a lot of space")
    assert verifier().verify(respaced, secrets).access_key_id == AK


def test_repeated_header_values_join_with_commas() -> None:
    request = replace_header(sign(headers={"X-Multi": "one,two"}), "X-Multi", "one")
    request = SignedRequest(request.method, request.path, request.query_string,
                            [*request.headers, ("x-multi", " two ")], request.body)
    assert verifier().verify(request, secrets).access_key_id == AK


def test_skew_at_the_limit_is_accepted() -> None:
    assert verifier(NOW + 300).verify(sign(), secrets).access_key_id == AK
    assert verifier(NOW - 300).verify(sign(), secrets).access_key_id == AK


@pytest.mark.parametrize("params", [
    {"b": "2", "a": "1"},
    [("a", "z"), ("a", "b"), ("A", "c")],
    {"space key": "a value with spaces", "plus": "1+1=2", "tilde~": "-_.~!*'()"},
    {"slash": "a/b?c&d=e", "unicode": "héllo wörld ☃", "empty": ""},
])
def test_query_params_canonicalise_like_botocore(params: Any) -> None:
    assert verifier().verify(sign(params=params), secrets).access_key_id == AK


@pytest.mark.parametrize("query", [
    [("b", "2"), ("a", "1")],
    [("Action", "List Keys"), ("x", "a+b/c~d")],
    [("k", "v2"), ("k", "v1"), ("uni", "ä€")],
])
def test_query_in_url_canonicalises_like_botocore(query: list[tuple[str, str]]) -> None:
    # The form in which botocore's serializers put queries into URLs.
    request = sign(url=URL + "?" + percent_encode_sequence(query))
    assert verifier().verify(request, secrets).access_key_id == AK


@pytest.mark.parametrize("url", [
    "https://kms.us-east-1.amazonaws.com",
    "https://kms.us-east-1.amazonaws.com/a/./b/../c//d/",
    "https://kms.us-east-1.amazonaws.com/foo%20bar/%E2%98%83/~user/",
    "https://kms.us-east-1.amazonaws.com/../..//x/..",
    "https://kms.us-east-1.amazonaws.com/a:b@c$d&e=f+g,h;i",
])
def test_odd_paths_canonicalise_like_botocore(url: str) -> None:
    assert verifier().verify(sign(url=url), secrets).access_key_id == AK


def test_signed_content_sha256_matching_the_body_verifies() -> None:
    request = sign(headers={"X-Amz-Content-SHA256": hashlib.sha256(BODY).hexdigest()})
    assert verifier().verify(request, secrets).access_key_id == AK


# -- rejected requests ------------------------------------------------------------------------

def test_wrong_secret_is_rejected() -> None:
    assert raises(InvalidSignatureException, sign(sk="not-the-secret")).message == MISMATCH


def test_unknown_access_key_is_rejected() -> None:
    error = raises(UnrecognizedClientException, sign(ak="AKIDUNKNOWN"))
    assert error.message == "The security token included in the request is invalid."


@pytest.mark.parametrize("tamper", [
    lambda r: with_body(r, BODY.replace(b"alias/test", b"alias/evil")),
    lambda r: with_body(r, BODY + b" "),
    lambda r: replace_header(r, "Content-Type", "application/x-amz-json-1.0"),
    lambda r: replace_header(r, "X-Amz-Target", "TrentService.Decrypt"),
    lambda r: replace_header(r, "Host", "kms.eu-west-1.amazonaws.com"),
    lambda r: replace_header(r, "X-Amz-Date", "20260101T000959Z"),
    lambda r: SignedRequest("PUT", r.path, r.query_string, r.headers, r.body),
    lambda r: SignedRequest(r.method, "/other", r.query_string, r.headers, r.body),
    lambda r: SignedRequest(r.method, r.path, "a=1", r.headers, r.body),
], ids=["body", "body-appended", "content-type", "target", "host", "date", "method", "path",
        "query"])
def test_tampered_request_is_rejected(tamper: Callable[[SignedRequest], SignedRequest]) -> None:
    assert raises(InvalidSignatureException, tamper(sign())).message == MISMATCH


def test_signed_content_sha256_not_matching_the_body_is_rejected() -> None:
    request = sign(headers={"X-Amz-Content-SHA256": hashlib.sha256(b"other").hexdigest()})
    assert raises(InvalidSignatureException, request).message == (
        "The provided 'x-amz-content-sha256' header does not match what was computed.")


@pytest.mark.parametrize(("signed", "now", "message"), [
    (datetime(2026, 1, 1, 0, 0, 0), datetime(2026, 1, 1, 0, 10, 0),
     "Signature expired: 20260101T000000Z is now earlier than 20260101T000500Z "
     "(20260101T001000Z - 5 min.)"),
    (datetime(2026, 1, 1, 0, 0, 0), datetime(2026, 1, 1, 0, 6, 0),
     "Signature expired: 20260101T000000Z is now earlier than 20260101T000100Z "
     "(20260101T000600Z - 5 min.)"),
    (datetime(2026, 1, 1, 0, 20, 0), datetime(2026, 1, 1, 0, 10, 0),
     "Signature not yet current: 20260101T002000Z is still later than 20260101T001500Z "
     "(20260101T001000Z + 5 min.)"),
])
def test_clock_skew_is_rejected(signed: datetime, now: datetime, message: str) -> None:
    error = raises(InvalidSignatureException, sign(when=signed),
                   now=float(calendar.timegm(now.timetuple())))
    assert error.message == message


def test_expiry_is_checked_before_the_secret_is_looked_up() -> None:
    lookup = mock.Mock(return_value=SK)
    raises(InvalidSignatureException, sign(), now=NOW + 360, lookup=lookup)
    lookup.assert_not_called()


def test_wrong_region_scope_is_rejected() -> None:
    error = raises(InvalidSignatureException, sign(region="ap-south-1"))
    assert error.message == "Credential should be scoped to a valid region. "


def test_wrong_service_scope_is_rejected() -> None:
    error = raises(InvalidSignatureException, sign(service="s3"))
    assert error.message == "Credential should be scoped to correct service: 'kms'. "


def test_scope_date_must_match_the_request_date() -> None:
    request = replace_header(sign(), "X-Amz-Date", "20260102T001000Z")
    assert raises(InvalidSignatureException, request, now=NOW + 86400).message == (
        "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from "
        "HTTP: '20260101' != '20260102', from '20260102T001000Z'.")


def test_missing_authorization_is_rejected() -> None:
    error = raises(MissingAuthenticationTokenException,
                   replace_header(sign(), "Authorization", None))
    assert error.message == "Missing Authentication Token"


MALFORMED = "Authorization header is malformed"


def _auth(request: SignedRequest) -> str:
    return header(request, "Authorization")


@pytest.mark.parametrize(("mangle", "expected"), [
    (lambda a: a[: a.index(", SignedHeaders")],
     "Authorization header requires 'Signature' parameter. Authorization header requires "
     "'SignedHeaders' parameter. Authorization=AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
    (lambda a: a[: a.index(", Signature")],
     "Authorization header requires 'Signature' parameter. Authorization=AWS4-HMAC-SHA256 "
     "Credential=AKIDEXAMPLE/20260101/us-east-1/kms/aws4_request, SignedHeaders=content-type;"),
    (lambda a: a[: a.index("Signature=") + len("Signature=")],
     "Authorization header requires 'Signature' parameter."),
    (lambda a: a[: a.index("Signature=") + len("Signatu")], MALFORMED),
    (lambda a: "AWS4-HMAC-SHA256", "Authorization header requires 'Credential' parameter. "
     "Authorization header requires 'Signature' parameter. "
     "Authorization header requires 'SignedHeaders' parameter. Authorization=AWS4-HMAC-SHA256"),
    (lambda a: "", "Unsupported AWS 'algorithm': ''"),
    (lambda a: a.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"),
     "Unsupported AWS 'algorithm': 'AWS4-HMAC-SHA512'"),
    (lambda a: "Basic QUtJREVYQU1QTEU6c2VjcmV0", "Unsupported AWS 'algorithm': 'Basic'"),
    (lambda a: a.replace("SignedHeaders=", "SignedHeaders=host;;"), "SignedHeaders is malformed"),
    (lambda a: a.replace("Credential=", "Credentials="), MALFORMED),
    (lambda a: a.replace(", Signature=", ", garbage, Signature="), MALFORMED),
    (lambda a: a + ", Signature=" + "0" * 64, MALFORMED),
    (lambda a: a.replace("/aws4_request", ""), "Credential must have exactly 5 slash-delimited"),
    (lambda a: a.replace("AKIDEXAMPLE/", "AKIDEXAMPLE//"), "Credential must have exactly 5"),
    (lambda a: re.sub(r"SignedHeaders=[^,]*", "SignedHeaders=content-type;x-amz-date", a),
     "'Host' must be a 'SignedHeader' in the AWS Authorization."),
])
def test_garbled_authorization_is_incomplete(mangle: Callable[[str], str], expected: str) -> None:
    request = sign()
    error = raises(IncompleteSignatureException,
                   replace_header(request, "Authorization", mangle(_auth(request))))
    assert error.message.startswith(expected)
    assert re.search(r"[0-9a-f]{64}", error.message) is None


def test_wrong_terminator_is_rejected() -> None:
    request = sign()
    mangled = replace_header(request, "Authorization",
                             _auth(request).replace("/aws4_request", "/aws5_request"))
    assert raises(InvalidSignatureException, mangled).message == (
        "Credential should be scoped with a valid terminator: 'aws4_request', not 'aws5_request'. ")


def test_missing_dates_are_incomplete() -> None:
    error = raises(IncompleteSignatureException, replace_header(sign(), "X-Amz-Date", None))
    assert error.message.startswith(
        "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header. "
        "Authorization=AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/kms/")
    assert "Signature" not in error.message


@pytest.mark.parametrize("value", ["2026-01-01T00:10:00Z", "20261301T001000Z", "now"])
def test_malformed_x_amz_date_is_incomplete(value: str) -> None:
    error = raises(IncompleteSignatureException, replace_header(sign(), "X-Amz-Date", value))
    assert error.message.startswith(f"Date must be in ISO-8601 'basic format'. Got '{value}'.")


def test_signature_that_is_not_hex_is_a_mismatch_not_a_crash() -> None:
    request = sign()
    mangled = re.sub(r"Signature=\w+", "Signature=\udcff\u2603", _auth(request))
    assert raises(InvalidSignatureException,
                  replace_header(request, "Authorization", mangled)).message == MISMATCH


# -- signing-key cache ------------------------------------------------------------------------

def test_signing_key_is_derived_once_per_scope() -> None:
    v = verifier()
    with mock.patch.object(sigv4, "derive_signing_key", wraps=sigv4.derive_signing_key) as derive:
        v.verify(sign(), secrets)
        v.verify(sign(body=b"{}", target="TrentService.ListKeys"), secrets)
        assert derive.call_count == 1
        v.verify(sign(region="eu-west-1"), secrets)
        v.verify(sign(ak="AKIDOTHER", sk="other-secret"), secrets)
        assert derive.call_count == 3


def test_signing_key_cache_is_bounded_and_evicts_oldest() -> None:
    v = verifier()
    keys = {f"AKID{i}": f"secret-{i}" for i in range(4)}
    with mock.patch.object(sigv4, "_CACHE_SIZE", 2), \
            mock.patch.object(sigv4, "derive_signing_key",
                              wraps=sigv4.derive_signing_key) as derive:
        for ak, sk in keys.items():
            v.verify(sign(ak=ak, sk=sk), keys.get)
        assert derive.call_count == 4
        v.verify(sign(ak="AKID3", sk="secret-3"), keys.get)  # newest, still cached
        assert derive.call_count == 4
        v.verify(sign(ak="AKID0", sk="secret-0"), keys.get)  # oldest, evicted
        assert derive.call_count == 5
        assert len(v._macs) == 2


# -- the signature's HMAC -------------------------------------------------------------------

@given(key=st.binary(max_size=200), message=st.binary(max_size=3000))
def test_signing_mac_is_hmac_sha256(key: bytes, message: bytes) -> None:
    assert sigv4.SigningMac(key).hexdigest(message) == hmac.new(
        key, message, hashlib.sha256).hexdigest()


def test_verification_keeps_the_gil() -> None:
    """A node verifies on its event loop beside its Raft and audit threads: a call that let
    go of the GIL would wait to win it back from them on every request."""
    v = verifier()
    requests = [sign(body=json.dumps({"n": n}).encode()) for n in range(5)]
    v.verify(requests[0], secrets)  # the signing key is derived before the count
    stop = threading.Event()
    turns = [0]

    def spin() -> None:
        while not stop.is_set():
            turns[0] += 1

    # A thread waiting for the GIL takes it only when the holder lets go, or after the
    # switch interval: far longer than the five verifications take.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.5)
    spinner = threading.Thread(target=spin)
    try:
        spinner.start()
        while turns[0] == 0:  # the spinner holds the GIL now and then; let it get going
            pass
        before = turns[0]
        for request in requests:
            v.verify(request, secrets)
        during = turns[0] - before
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)
    assert during == 0


# -- properties -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# What an HTTP header value can carry: visible ASCII, spaces and tabs.
header_values = st.text(st.sampled_from([chr(c) for c in range(0x20, 0x7F)] + ["\t"]),
                        max_size=40)
query_params = st.lists(st.tuples(st.text(max_size=10), st.text(max_size=10)), max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, custom=header_values, params=query_params, data=st.data())
def test_botocore_signed_requests_verify_and_any_body_flip_fails(
        value: Any, custom: str, params: list[tuple[str, str]], data: st.DataObject) -> None:
    body = json.dumps({"Payload": value}).encode()
    request = sign(body=body, params=params or None, headers={"X-Kmsd-Custom": custom})
    assert verifier().verify(request, secrets).access_key_id == AK

    index = data.draw(st.integers(0, len(body) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    mutated = bytearray(body)
    mutated[index] ^= flip
    with pytest.raises(InvalidSignatureException):
        verifier().verify(with_body(request, bytes(mutated)), secrets)


@given(st.lists(st.sampled_from(["a", "b%20c", ".", "..", "", "~x", "é", "%2F", "+", ":@"]),
                max_size=6))
def test_canonical_path_matches_botocore(segments: list[str]) -> None:
    path = "/" + "/".join(segments)
    signer = SigV4Auth(Credentials(AK, SK), "kms", "us-east-1")
    assert sigv4.canonical_path(path) == signer._normalize_url_path(path)


@given(query_params)
def test_canonical_query_matches_botocore(params: list[tuple[str, str]]) -> None:
    signer = SigV4Auth(Credentials(AK, SK), "kms", "us-east-1")
    assert sigv4.canonical_query(urlencode(params)) == \
        signer._canonical_query_string_params(params)


def test_signed_at_is_aware_utc() -> None:
    signed_at = verifier().verify(sign(), secrets).signed_at
    assert signed_at.utcoffset() == timedelta(0)


def test_malformed_date_header_is_incomplete() -> None:
    value = "Fri, 31 Dec 9999 23:59:59 -0100"  # UTC would be past datetime.max
    error = raises(IncompleteSignatureException,
                   replace_header(sign(headers={"Date": "x"}), "Date", value))
    assert error.message == f"Date must be in RFC 1123 format. Got '{value}'."


# Text as a lenient HTTP parser may hand it over: any code point, lone surrogates included.
hostile_text = st.lists(st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    ["\udcff", "\ud800", "%", "%zz", "=", ",", ";", "/", "&", "+", " ", "Signature="]),
    max_size=30).map("".join)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["Authorization", "X-Amz-Date", "Date", "Host", "path", "query"]),
       text=hostile_text, keep_prefix=st.booleans())
def test_hostile_input_never_escapes_as_anything_but_an_aws_error(field: str, text: str,
                                                   keep_prefix: bool) -> None:
    request = sign(params={"a": "b"})
    if field == "path":
        request = SignedRequest(request.method, text, request.query_string, request.headers,
                                request.body)
    elif field == "query":
        request = SignedRequest(request.method, request.path, text, request.headers,
                                request.body)
    else:
        prefix = header(request, field)[:30] if keep_prefix else ""
        request = replace_header(request, field, prefix + text)
    # Some edits are harmless (an unsigned Date, a path that normalises the same):
    # the property is that nothing but a client-facing AWS error ever escapes.
    try:
        verifier().verify(request, secrets)
    except KmsError as error:
        assert error.error_type != "KMSInternalException"
