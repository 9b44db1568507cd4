"""The shortcuts of SigV4 verification on the request path give the answers of the long way:
headers looked up in aiohttp's multidict, the botocore Authorization form, X-Amz-Date."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from unittest import mock

from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from kmsd.api.protocol import signed_request
from kmsd.auth import sigv4
from kmsd.auth.sigv4 import SignedRequest, SigV4Verifier
from kmsd.errors import KmsError
from tests.unit.test_sigv4 import (
    NOW,
    header,
    hostile_text,
    replace_header,
    secrets,
    sign,
    verifier,
)


def outcome(request: SignedRequest, now: float = NOW) -> object:
    try:
        return verifier(now).verify(request, secrets)
    except KmsError as error:
        return type(error).__name__, error.message


def as_multidict(request: SignedRequest) -> SignedRequest:
    return SignedRequest(request.method, request.path, request.query_string,
                         CIMultiDictProxy(CIMultiDict(list(request.headers))), request.body)


def test_a_signed_request_verifies_from_aiohttp_headers() -> None:
    request = sign(headers={"X-Extra": "a", "User-Agent": "ua"})
    assert outcome(as_multidict(request)) == outcome(request)
    assert outcome(request) == verifier().verify(request, secrets)


def test_only_signed_headers_matter_from_aiohttp_headers() -> None:
    request = sign()
    unsigned = replace_header(request, "User-Agent", "anything else")
    assert outcome(as_multidict(unsigned)) == outcome(request)
    for name in ("X-Amz-Target", "Content-Type", "Host"):
        changed = as_multidict(replace_header(request, name, header(request, name) + "x"))
        assert outcome(changed)[0] == "InvalidSignatureException"  # type: ignore[index]


def test_the_server_passes_its_parsed_headers() -> None:
    request = sign()
    aiohttp_request = make_mocked_request(
        "POST", "/", headers=CIMultiDictProxy(CIMultiDict(list(request.headers))))
    assert outcome(signed_request(aiohttp_request, request.body)) == outcome(request)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["Authorization", "X-Amz-Date", "Date", "Host", "X-Amz-Target",
                              "X-Amz-Content-Sha256"]),
       text=hostile_text, keep_prefix=st.booleans(), repeat=st.booleans())
def test_aiohttp_headers_and_header_pairs_give_the_same_answer(field: str, text: str,
                                                               keep_prefix: bool,
                                                               repeat: bool) -> None:
    request = sign(headers={"X-Amz-Content-Sha256": "x"} if "Sha" in field else None)
    prefix = header(request, field)[:30] if keep_prefix else ""
    request = replace_header(request, field, prefix + text)
    if repeat:
        request = SignedRequest(request.method, request.path, request.query_string,
                                [*request.headers, (field.lower(), text)], request.body)
    assert outcome(as_multidict(request)) == outcome(request)


_value = st.text(st.sampled_from("aA0/=;-_ ,\t\u00a0\x1c") | st.characters(), max_size=12)


@settings(max_examples=500, deadline=None)
@given(credential=_value, signed=_value, signature=_value,
       separator=st.sampled_from([", ", ",", " , ", ",\t"]),
       order=st.permutations(["Credential", "SignedHeaders", "Signature"]),
       lead=st.sampled_from(["", " ", "\t"]))
def test_the_botocore_authorization_shortcut_reads_as_the_general_parser(
        credential: str, signed: str, signature: str, separator: str, order: list[str],
        lead: str) -> None:
    values = {"Credential": credential, "SignedHeaders": signed, "Signature": signature}
    text = lead + sigv4.ALGORITHM + " " + separator.join(f"{n}={values[n]}" for n in order)

    def parse() -> object:
        try:
            return SigV4Verifier._parse_authorization(text)
        except KmsError as error:
            return error.message

    fast = parse()
    with mock.patch.object(sigv4, "_BOTOCORE_AUTHORIZATION", re.compile(r"(?!)")):
        assert parse() == fast


def test_the_botocore_authorization_shortcut_is_taken() -> None:
    text = header(sign(), "Authorization")
    assert sigv4._BOTOCORE_AUTHORIZATION.fullmatch(text)


@settings(max_examples=1000, deadline=None)
@given(digits=st.text(st.sampled_from("0123456789"), min_size=14, max_size=14)
       | st.datetimes().map(lambda d: d.strftime("%Y%m%d%H%M%S").zfill(14)))
def test_x_amz_date_parses_as_strptime_does(digits: str) -> None:
    raw = f"{digits[:8]}T{digits[8:]}Z"
    try:
        expected: object = datetime.strptime(raw, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        expected = ValueError
    try:
        got: object = sigv4._parse_amz_date(raw)
    except ValueError:
        got = ValueError
    assert got == expected
