"""Hostile input against a real 3-node cluster, over real HTTP.

Requests are built from botocore's KMS service model for every operation (valid,
boundary and invalid values: tests/fuzz/shapes.py), and by hand for what a model
cannot express: malformed JSON, wrong content types, oversize bodies, bad base64,
truncated, bit-flipped and foreign ciphertext blobs, unknown targets and SigV4
variants (missing headers, wrong region or service, expired or future dates,
signatures replayed over a changed body or target, unknown keys, wrong secrets).

The contract every answer must keep:
- an AWS JSON 1.1 answer: a JSON object; an error has a known AWS `__type` and a
  `message` that is text when present (AWS itself answers some errors, such as
  UnknownOperationException, with a bare `__type`); a 4xx status, never a 5xx except
  KMSInternalException for want of an audit quorum (which a healthy cluster should
  not even give);
- no crash: every node process alive, and no request escaping as an unexpected
  exception into the node's log (`request_failed`);
- a refused request changes nothing: a fingerprint of the state taken through the
  API (ListKeys, ListAliases, DescribeKey of every key, and grants, policy, tags and
  rotations of the keys the fuzzer knows) is the same before and after.

The last test scans every node's data dir, log and audit records for any plaintext
or data key a request carried or an answer returned.

KMSD_FUZZ_EXAMPLES sets the examples per strategy (default 5; e.g. 500 for a long
run, which also draws new random examples instead of the fixed derandomized ones).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chaos.secret_scan import scan
from tests.fuzz.shapes import MODEL, OPERATIONS, Builder, Pools
from tests.fuzz.wire import CONTENT_TYPE, TARGET_PREFIX, Answer, Request, send
from tests.integration.harness import Cluster, _alive, start_cluster

EXAMPLES = int(os.environ.get("KMSD_FUZZ_EXAMPLES", "5"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize="KMSD_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=list(HealthCheck))
AUDIT_UNAVAILABLE = "The request could not be recorded in the audit log"
PROTOCOL_ERRORS = {"SerializationException", "ValidationException", "UnknownOperationException",
                   "MissingAuthenticationTokenException", "IncompleteSignatureException",
                   "InvalidSignatureException", "UnrecognizedClientException",
                   "AccessDeniedException", "ThrottlingException"}
KNOWN_ERRORS = PROTOCOL_ERRORS | {shape.name for op in OPERATIONS
                                  for shape in MODEL.operation_model(op).error_shapes}
AUTH_ERRORS = {"MissingAuthenticationTokenException", "IncompleteSignatureException",
               "InvalidSignatureException", "UnrecognizedClientException"}
# Operations that may change state: a refused one is checked example by example.
_MUTATING_PREFIXES = ("Create", "Delete", "Update", "Put", "Enable", "Disable", "Schedule",
                      "Cancel", "Tag", "Untag", "Retire", "Revoke", "Rotate", "Import",
                      "Replicate", "Connect", "Disconnect")
MUTATING = tuple(op for op in OPERATIONS if op.startswith(_MUTATING_PREFIXES))
CONTEXT = {"fuzz": "context"}


def _policy(account: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Sid": "root", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
        "Action": "kms:*", "Resource": "*"}]})


def _paged(call: Callable[..., dict[str, Any]], key: str, **kwargs: Any) -> list[Any]:
    out, marker = [], None
    for _ in range(1000):
        page = call(**kwargs, **({"Marker": marker} if marker else {}))
        out += page.get(key, [])
        if not page.get("Truncated"):
            return out
        marker = page["NextMarker"]
    raise AssertionError("pagination did not end")


def _outcome(call: Callable[[], dict[str, Any]]) -> Any:
    try:
        response = call()
    except ClientError as error:
        return ("error", error.response["Error"]["Code"])
    response.pop("ResponseMetadata", None)
    return response


@dataclass
class Fuzz:
    cluster: Cluster
    pools: Pools
    tracked: list[str]        # keys whose grants, policy, tags and rotations are fingerprinted
    sealing_key: dict[str, Any]   # a key only the targeted tests use
    other_key: dict[str, Any]
    blob: bytes               # sealed under sealing_key with CONTEXT
    other_blob: bytes         # sealed under other_key with CONTEXT
    secrets: list[bytes] = field(default_factory=list)
    answers: Counter = field(default_factory=Counter)
    # Error types answered without a message (AWS too sends some bare: see check_answer).
    without_message: Counter = field(default_factory=Counter)
    _node: int = 0

    def __post_init__(self) -> None:
        self.clients = [self.cluster.client(n, retries=4) for n in range(self.cluster.size)]
        self.pool = ThreadPoolExecutor(max_workers=6)

    @property
    def credentials(self) -> Credentials:
        return self.cluster.credentials()

    def send(self, request: Request, node: int | None = None) -> Answer:
        if node is None:
            self._node = (self._node + 1) % self.cluster.size
            node = self._node
        self._remember_sent(request.body)
        answer = send(self.cluster.info["endpoints"][node], request, self.credentials,
                      self.cluster.region)
        self.answers[(answer.status, answer.error_type)] += 1
        if answer.status != 200 and answer.message is None:
            self.without_message[str(answer.error_type)] += 1
        if answer.status == 200 and isinstance(answer.body, dict):
            for name in ("Plaintext", "SharedSecret"):
                value = answer.body.get(name)
                if isinstance(value, str):
                    self.secrets.append(base64.b64decode(value))
        return answer

    def op(self, operation: str, body: dict[str, Any] | bytes, **kwargs: Any) -> Request:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Request(raw, TARGET_PREFIX + operation, **kwargs)

    def _remember_sent(self, body: bytes) -> None:
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return
        if isinstance(parsed, dict) and isinstance(parsed.get("Plaintext"), str):
            with contextlib.suppress(binascii.Error, ValueError):
                self.secrets.append(base64.b64decode(parsed["Plaintext"], validate=True))

    def fingerprint(self) -> dict[str, Any]:
        """The state as the API shows it (requests spread over the nodes, in parallel)."""
        c = self.clients
        keys = sorted(k["KeyId"] for k in _paged(c[0].list_keys, "Keys", Limit=1000))
        calls: dict[str, Callable[[], Any]] = {
            "aliases": lambda: sorted((a["AliasName"], a.get("TargetKeyId", ""))
                                      for a in _paged(c[1].list_aliases, "Aliases")),
        }
        for i, key in enumerate(keys):
            calls[f"describe {key}"] = (lambda k=key, n=i: _outcome(
                lambda: c[n % 3].describe_key(KeyId=k)))
        for i, key in enumerate(self.tracked):
            client = c[i % 3]
            calls[f"grants {key}"] = lambda k=key, cl=client: _outcome(
                lambda: {"Grants": _paged(cl.list_grants, "Grants", KeyId=k)})
            calls[f"policy {key}"] = lambda k=key, cl=client: _outcome(
                lambda: cl.get_key_policy(KeyId=k, PolicyName="default"))
            calls[f"tags {key}"] = lambda k=key, cl=client: _outcome(
                lambda: cl.list_resource_tags(KeyId=k))
            calls[f"rotation {key}"] = lambda k=key, cl=client: _outcome(
                lambda: cl.get_key_rotation_status(KeyId=k))
            calls[f"rotations {key}"] = lambda k=key, cl=client: _outcome(
                lambda: {"Rotations": _paged(cl.list_key_rotations, "Rotations", KeyId=k)})
        futures = {name: self.pool.submit(call) for name, call in calls.items()}
        return {"keys": keys, **{name: f.result() for name, f in futures.items()}}

    def nodes_alive(self) -> list[int]:
        return [n for n in range(self.cluster.size) if not _alive(self.cluster.pid(n))]


def check_answer(answer: Answer, what: str = "") -> None:
    """The contract of every answer: JSON, a known AWS error type, no 5xx but a quorum one."""
    where = f"{what}: {answer}"
    assert isinstance(answer.body, dict), f"not a JSON object: {where}"
    assert answer.headers.get("content-type", "").startswith(CONTENT_TYPE), where
    assert answer.request_id, where
    if answer.status == 200:
        return
    assert isinstance(answer.error_type, str) and answer.error_type in KNOWN_ERRORS, where
    assert answer.message is None or isinstance(answer.message, str), where
    if answer.status >= 500:
        assert answer.error_type == "KMSInternalException" and \
            str(answer.message).startswith(AUDIT_UNAVAILABLE), f"a 5xx: {where}"
    else:
        assert 400 <= answer.status < 500, where


def check_refused(fuzz: Fuzz, answer: Answer, before: dict[str, Any], what: str) -> None:
    check_answer(answer, what)
    assert answer.status != 200, f"{what} was accepted: {answer}"
    after = fuzz.fingerprint()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"{what} was refused ({answer}) but changed {changed}"


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    cluster = start_cluster(str(tmp_path_factory.mktemp("fuzz")))
    prepared: Fuzz | None = None
    try:
        prepared = _prepare(cluster)
        yield prepared
    finally:
        if prepared is not None:
            prepared.pool.shutdown()
        cluster.stop()


def _prepare(cluster: Cluster) -> Fuzz:
    kms = cluster.client(0, retries=4)
    account = cluster.info["account_id"]
    grantee = f"arn:aws:iam::{account}:user/fuzz-grantee"

    def new_key(**kwargs: Any) -> dict[str, Any]:
        return kms.create_key(**kwargs)["KeyMetadata"]

    one = new_key(Description="fuzz one", Tags=[{"TagKey": "team", "TagValue": "fuzz"}])
    two = new_key(Description="fuzz two")
    kms.disable_key(KeyId=two["KeyId"])
    three = new_key(Description="fuzz three")
    kms.enable_key_rotation(KeyId=three["KeyId"])
    kms.create_alias(AliasName="alias/fuzz-one", TargetKeyId=one["KeyId"])
    grant = kms.create_grant(KeyId=one["KeyId"], GranteePrincipal=grantee,
                             Operations=["Encrypt", "Decrypt"], Name="fuzz-grant")
    sealing, other = new_key(Description="fuzz sealing"), new_key(Description="fuzz other")
    sealed = kms.encrypt(KeyId=sealing["KeyId"], Plaintext=os.urandom(40),
                         EncryptionContext=CONTEXT)["CiphertextBlob"]
    other_sealed = kms.encrypt(KeyId=other["KeyId"], Plaintext=os.urandom(40),
                               EncryptionContext=CONTEXT)["CiphertextBlob"]
    blobs = [kms.encrypt(KeyId=k["KeyId"], Plaintext=os.urandom(48),
                         EncryptionContext=CONTEXT)["CiphertextBlob"] for k in (one, three)]
    blobs.append(kms.generate_data_key(KeyId=one["KeyId"], KeySpec="AES_256")["CiphertextBlob"])
    unknown = str(uuid.uuid4())
    region = cluster.region
    pools = Pools(
        key_ids=[one["KeyId"], one["Arn"], two["KeyId"], three["KeyId"], three["Arn"], unknown,
                 f"arn:aws:kms:{region}:{account}:key/{unknown}",
                 f"arn:aws:kms:{region}:{account}:alias/fuzz-one"],
        aliases=["alias/fuzz-one", "alias/none"], grant_ids=[grant["GrantId"], "0" * 64],
        grant_tokens=[grant["GrantToken"]], ciphertexts=blobs,
        principals=[grantee, f"arn:aws:iam::{account}:root", "*"],
        contexts=[CONTEXT, {}], policies=[_policy(account), "{}", "not a policy"])
    fuzz = Fuzz(cluster, pools, tracked=[one["KeyId"], two["KeyId"], three["KeyId"],
                                         sealing["KeyId"]],
                sealing_key=sealing, other_key=other, blob=sealed, other_blob=other_sealed)
    return fuzz


@pytest.fixture(autouse=True)
def no_crash_no_escape(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every node alive after each test, and no request escaped into a node's log as an
    unexpected exception (tests that pin a known bug are exempt)."""
    if "fuzz" not in request.fixturenames:
        yield
        return
    fuzz: Fuzz = request.getfixturevalue("fuzz")
    logs = [os.path.join(fuzz.cluster.data_dir, f"node-{n + 1}", "node.log")
            for n in range(fuzz.cluster.size)]
    offsets = [os.path.getsize(path) for path in logs]
    yield
    assert fuzz.nodes_alive() == [], "a node process died"
    if request.node.get_closest_marker("xfail") is not None:
        return
    escaped = []
    for path, offset in zip(logs, offsets, strict=True):
        with open(path, "rb") as handle:
            handle.seek(offset)
            for line in handle.read().splitlines():
                if b'"request_failed"' in line:
                    event = json.loads(line)
                    escaped.append(f"{event.get('operation')}: {event.get('exc_type')}")
    assert escaped == [], f"requests escaped as internal errors: {escaped}"


# --- every operation, from the model ------------------------------------------------------

@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_answers_hostile_members_by_the_contract(fuzz: Fuzz,
                                                                 operation: str) -> None:
    builder = Builder(fuzz.pools)
    mutating = operation in MUTATING
    state = {"before": fuzz.fingerprint()}

    @SETTINGS
    @given(body=builder.body(operation))
    def run(body: bytes) -> None:
        answer = fuzz.send(fuzz.op(operation, body))
        check_answer(answer, f"{operation} {body[:200]!r}")
        if not mutating:
            return
        after = fuzz.fingerprint()
        if answer.status != 200:
            changed = sorted(k for k in set(after) | set(state["before"])
                             if after.get(k) != state["before"].get(k))
            assert not changed, f"{operation} refused ({answer}) but changed {changed}"
        state["before"] = after

    run()
    if not mutating:
        assert fuzz.fingerprint() == state["before"], f"{operation} changed the state"


# --- the body itself ----------------------------------------------------------------------

MALFORMED = [b"{", b"}", b"[]", b"null", b"1", b'"text"', b"true", b'{"KeyId":}', b"{'a': 1}",
             b'{"a":1}{"b":2}', b'{"a":1,}', b"\xff\xfe{\x00}\x00", b"\xc3\x28",
             b'{"a":"\xff"}', b"\x00", b" " * 1000, b'{"Description": "unterminated', b"NaN",
             b"[" * 50]


@SETTINGS
@given(body=st.one_of(st.sampled_from(MALFORMED), st.binary(min_size=1, max_size=300)),
       operation=st.sampled_from(["CreateKey", "Encrypt", "CreateAlias", "ListKeys"]))
def test_malformed_json_is_a_serialization_error(fuzz: Fuzz, body: bytes,
                                                 operation: str) -> None:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict) or not body.strip():
        return  # valid JSON objects (and empty bodies, read as {}) are the model fuzzer's
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op(operation, body))
    check_refused(fuzz, answer, before, f"{operation} with body {body[:80]!r}")
    assert answer.error_type == "SerializationException", answer


CONTENT_TYPES = [None, "", "text/plain", "application/x-www-form-urlencoded",
                 "application/x-amz-json-1.0", "application/xml", "multipart/form-data",
                 "application/x-amz-json-1.1x", "application/x-amz-json", "*/*"]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_wrong_content_type_is_refused_and_changes_nothing(fuzz: Fuzz,
                                                           content_type: str | None) -> None:
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op("CreateKey", {"Description": "must not exist"},
                               content_type=content_type))
    check_refused(fuzz, answer, before, f"CreateKey as {content_type!r}")
    assert answer.error_type == "SerializationException", answer


def test_content_type_parameters_are_accepted(fuzz: Fuzz) -> None:
    answer = fuzz.send(fuzz.op("ListKeys", {}, content_type=CONTENT_TYPE + "; charset=utf-8"))
    check_answer(answer)
    assert answer.status == 200, answer


def test_an_oversize_body_is_a_client_error(fuzz: Fuzz) -> None:
    before = fuzz.fingerprint()
    body = b'{"Description":"' + b"A" * (1024 * 1024 + 16) + b'"}'
    answer = fuzz.send(fuzz.op("CreateKey", body))
    check_refused(fuzz, answer, before, "an oversize CreateKey")


def test_a_body_cut_short_is_not_an_internal_error(fuzz: Fuzz) -> None:
    import socket
    import time
    from urllib.parse import urlsplit

    node = 1
    log = os.path.join(fuzz.cluster.data_dir, f"node-{node + 1}", "node.log")
    offset = os.path.getsize(log)
    url = urlsplit(fuzz.cluster.info["endpoints"][node])
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: " + url.netloc.encode() +
                     b"\r\nX-Amz-Target: TrentService.CreateKey\r\nContent-Type: " +
                     CONTENT_TYPE.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"Descr")
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(e.get("event") == "request" for e in events):
        time.sleep(0.2)
        with open(log, "rb") as handle:
            handle.seek(offset)
            events = [json.loads(line) for line in handle.read().splitlines()]
    assert fuzz.nodes_alive() == []
    assert [e for e in events if e.get("event") == "request_failed"] == []


def test_deeply_nested_json_is_a_serialization_error(fuzz: Fuzz) -> None:
    for body in (b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        before = fuzz.fingerprint()
        answer = fuzz.send(fuzz.op("CreateKey", body))
        check_refused(fuzz, answer, before, "deeply nested JSON")
        assert answer.error_type == "SerializationException", answer


def test_lone_surrogates_are_a_client_error(fuzz: Fuzz) -> None:
    key = fuzz.tracked[0]
    cases = [("CreateKey", {"Description": "\ud800"}),
             ("CreateKey", {"Tags": [{"TagKey": "\udfff", "TagValue": "x"}]}),
             ("UpdateKeyDescription", {"KeyId": key, "Description": "a\udc80b"}),
             ("TagResource", {"KeyId": key, "Tags": [{"TagKey": "k", "TagValue": "\ud800"}]}),
             ("Encrypt", {"KeyId": key, "Plaintext": "QUJD",
                          "EncryptionContext": {"\ud800": "v"}})]
    failures = []
    for operation, body in cases:
        before = fuzz.fingerprint()
        answer = fuzz.send(fuzz.op(operation, body))
        try:
            check_refused(fuzz, answer, before, f"{operation} with a lone surrogate")
        except AssertionError as error:
            failures.append(str(error)[:300])
    assert failures == []


@pytest.mark.parametrize("operation,body", [
    ("ListRetirableGrants", {}), ("ListRetirableGrants", {"Marker": "0"}),
    ("CreateGrant", {"Operations": ["Encrypt"]})])
def test_optional_members_kmsd_needs_are_a_validation_error(fuzz: Fuzz, operation: str,
                                                            body: dict[str, Any]) -> None:
    if "Operations" in body:
        body = {**body, "KeyId": fuzz.tracked[0]}
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op(operation, body))
    check_refused(fuzz, answer, before, f"{operation} {body}")
    assert answer.error_type == "ValidationException", answer


def _not_canonical_base64(text: str) -> bool:
    try:
        return bool(len(text) % 4) or not binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return True


@SETTINGS
@given(value=st.one_of(
    st.sampled_from(["abc", "ab!=", "QUJD=", "QU JD", "QUJD\n", "-_-_", "QUJ\u00e9", "====",
                     "QQ", "Q===", "QUJDRA=", "QUJDRA", "\u0000AAA"]),
    st.text(min_size=1, max_size=40)).filter(_not_canonical_base64),
    member=st.sampled_from([("Encrypt", "Plaintext"), ("Decrypt", "CiphertextBlob"),
                            ("ReEncrypt", "CiphertextBlob"), ("GenerateMac", "Message")]))
def test_bad_base64_is_refused(fuzz: Fuzz, value: str, member: tuple[str, str]) -> None:
    operation, name = member
    body: dict[str, Any] = {name: value, "KeyId": fuzz.sealing_key["KeyId"],
                            "DestinationKeyId": fuzz.sealing_key["KeyId"],
                            "MacAlgorithm": "HMAC_SHA_256"}
    answer = fuzz.send(fuzz.op(operation, body))
    check_answer(answer, f"{operation}.{name}={value!r}")
    assert answer.error_type in ("SerializationException", "ValidationException"), answer


# --- ciphertext blobs ---------------------------------------------------------------------

HEADER = 34  # version, kdf, key id (16), backing version (4), nonce (12): kmsd/ciphertext_blob.py
KEY_ID_BYTES = range(2, 18)


def _decrypt_refused(fuzz: Fuzz, blob: bytes, what: str, context: dict[str, str] | None = None,
                     key_id: str | None = None) -> Answer:
    body: dict[str, Any] = {"CiphertextBlob": base64.b64encode(blob).decode(),
                            "EncryptionContext": CONTEXT if context is None else context}
    if key_id:
        body["KeyId"] = key_id
    answer = fuzz.send(fuzz.op("Decrypt", body))
    check_answer(answer, what)
    assert answer.status != 200, f"{what} decrypted: {answer}"
    return answer


@SETTINGS
@given(data=st.data())
def test_bit_flipped_ciphertexts_never_decrypt(fuzz: Fuzz, data: st.DataObject) -> None:
    blob = bytearray(fuzz.blob)
    position = data.draw(st.integers(0, len(blob) - 1), label="position")
    blob[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    answer = _decrypt_refused(fuzz, bytes(blob), f"a flip at byte {position}")
    # The key id bytes name another (absent) key; every other flip fails authentication.
    allowed = {"InvalidCiphertextException"} | (
        {"NotFoundException"} if position in KEY_ID_BYTES else set())
    assert answer.error_type in allowed, (position, answer)


def test_truncated_and_extended_ciphertexts_never_decrypt(fuzz: Fuzz) -> None:
    blob = fuzz.blob
    for length in sorted({1, 2, 17, 18, 21, 22, 33, HEADER, HEADER + 1, HEADER + 15,
                          HEADER + 16, len(blob) - 16, len(blob) - 1}):
        answer = _decrypt_refused(fuzz, blob[:length], f"the first {length} bytes")
        assert answer.error_type == "InvalidCiphertextException", (length, answer)
    for extra in (b"\x00", b"\x00" * 16, os.urandom(100)):
        answer = _decrypt_refused(fuzz, blob + extra, f"{len(extra)} bytes appended")
        assert answer.error_type == "InvalidCiphertextException", answer
    answer = _decrypt_refused(fuzz, b"", "an empty blob")
    assert answer.error_type == "ValidationException", answer


def test_foreign_and_spliced_ciphertexts_never_decrypt(fuzz: Fuzz) -> None:
    blob, other = fuzz.blob, fuzz.other_blob
    header = blob[:HEADER]
    # Sealed by "another cluster": the same layout and key id, under another AES key.
    aad = header + json.dumps(CONTEXT, separators=(",", ":"), sort_keys=True).encode()
    foreign = header + AESGCM(AESGCM.generate_key(256)).encrypt(header[22:34], b"x" * 40, aad)
    aws_like = b"\x01\x02\x02\x00\x78" + os.urandom(180)  # AWS KMS's own blob layout
    cases = {"foreign key material": foreign, "another key's body": header + other[HEADER:],
             "another key's header": other[:HEADER] + blob[HEADER:],
             "AWS-style blob": aws_like, "random bytes": os.urandom(len(blob))}
    for what, candidate in cases.items():
        answer = _decrypt_refused(fuzz, candidate, what)
        assert answer.error_type in ("InvalidCiphertextException", "NotFoundException"), \
            (what, answer)
    unknown_key = blob[:2] + uuid.uuid4().bytes + blob[18:]
    answer = _decrypt_refused(fuzz, unknown_key, "a blob naming an unknown key")
    assert answer.error_type in ("NotFoundException", "InvalidCiphertextException"), answer
    answer = _decrypt_refused(fuzz, blob, "the wrong context", context={"fuzz": "other"})
    assert answer.error_type == "InvalidCiphertextException", answer
    answer = _decrypt_refused(fuzz, blob, "no context", context={})
    assert answer.error_type == "InvalidCiphertextException", answer
    answer = _decrypt_refused(fuzz, blob, "another KeyId", key_id=fuzz.other_key["KeyId"])
    assert answer.error_type == "IncorrectKeyException", answer
    # ReEncrypt of a tampered blob is refused too, and creates nothing.
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op("ReEncrypt", {
        "CiphertextBlob": base64.b64encode(foreign).decode(), "SourceEncryptionContext": CONTEXT,
        "DestinationKeyId": fuzz.other_key["KeyId"]}))
    check_refused(fuzz, answer, before, "ReEncrypt of a foreign blob")
    # The genuine blob still decrypts: the refusals above changed nothing.
    good = fuzz.send(fuzz.op("Decrypt", {"CiphertextBlob": base64.b64encode(blob).decode(),
                                         "EncryptionContext": CONTEXT}))
    assert good.status == 200, good


# --- targets ------------------------------------------------------------------------------

# (Whitespace around a header value is not part of it in HTTP: "TrentService.CreateKey "
# is CreateKey, so it is not here.)
TARGETS = [None, "", "TrentService.", "TrentService.Nope", "TrentService.encrypt",
           "trentservice.CreateKey", "Other.CreateKey", "TrentService.CreateKey.Extra",
           "TrentService.CreateKeyX", "TrentService." + "A" * 5000, "TrentService.Create%4Bey",
           "TrentService.Create Key", "TrentService.__init__", "TrentService.CreateKey,Encrypt"]


@pytest.mark.parametrize("target", TARGETS)
def test_unknown_targets_are_unknown_operations(fuzz: Fuzz, target: str | None) -> None:
    before = fuzz.fingerprint()
    answer = fuzz.send(Request(json.dumps({"Description": "must not exist"}).encode(), target))
    check_refused(fuzz, answer, before, f"target {target!r}")
    assert answer.error_type == "UnknownOperationException", answer


@pytest.mark.parametrize("method,path", [("GET", "/"), ("PUT", "/"), ("DELETE", "/"),
                                         ("PATCH", "/")])
def test_other_methods_are_refused(fuzz: Fuzz, method: str, path: str) -> None:
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op("CreateKey", {"Description": "must not exist"}, method=method,
                               path=path))
    check_refused(fuzz, answer, before, f"{method} {path}")


# --- SigV4 --------------------------------------------------------------------------------

def _drop(name: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda headers: {k: v for k, v in headers.items() if k.lower() != name}


def _edit_authorization(edit: Callable[[str], str]) -> Callable[[dict[str, str]], dict[str, str]]:
    def apply(headers: dict[str, str]) -> dict[str, str]:
        out = dict(headers)
        out["Authorization"] = edit(out["Authorization"])
        return out
    return apply


def _set(name: str, value: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda headers: {**{k: v for k, v in headers.items() if k.lower() != name.lower()},
                            name: value}


def _other_target(headers: dict[str, str]) -> dict[str, str]:
    """The signed request sent to another operation (a signature replayed elsewhere)."""
    target = next(v for k, v in headers.items() if k.lower() == "x-amz-target")
    other = "DisableKey" if target.endswith(".ScheduleKeyDeletion") else "ScheduleKeyDeletion"
    return _set("X-Amz-Target", TARGET_PREFIX + other)(headers)


def _flip_signature(auth: str) -> str:
    last = auth[-1]
    return auth[:-1] + ("0" if last != "0" else "1")


def _ago(**delta: float) -> Callable[[], dict[str, Any]]:
    return lambda: {"at": datetime.now(UTC) - timedelta(**delta)}


def _amz_date_shifted() -> dict[str, Any]:
    # Same day as the signature in all but the first 30 s after midnight UTC.
    shifted = (datetime.now(UTC) - timedelta(seconds=30)).strftime("%Y%m%dT%H%M%SZ")
    return {"tamper_headers": _set("X-Amz-Date", shifted)}


# Each variant: request options (made when sent: dates are relative to now), the errors.
SIGV4_VARIANTS: dict[str, tuple[Callable[[], dict[str, Any]], set[str]]] = {
    "unsigned": (lambda: {"sign": False}, {"MissingAuthenticationTokenException"}),
    "no date": (lambda: {"tamper_headers": _drop("x-amz-date")},
                {"IncompleteSignatureException"}),
    "garbage date": (lambda: {"tamper_headers": _set("X-Amz-Date", "yesterday")},
                     {"IncompleteSignatureException"}),
    "other region": (lambda: {"region": "eu-west-3"}, {"InvalidSignatureException"}),
    "other service": (lambda: {"service": "s3"}, {"InvalidSignatureException"}),
    "expired": (_ago(minutes=16), {"InvalidSignatureException"}),
    "from the future": (_ago(minutes=-16), {"InvalidSignatureException"}),
    "unknown access key": (lambda: {"credentials": Credentials("AKIAFUZZFUZZFUZZFUZZ",
                                                               "x" * 40)},
                           {"UnrecognizedClientException"}),
    "flipped signature": (lambda: {"tamper_headers": _edit_authorization(_flip_signature)},
                          {"InvalidSignatureException"}),
    "host not signed": (lambda: {"tamper_headers": _edit_authorization(
        lambda a: a.replace("host;", "").replace(";host", ""))},
        {"IncompleteSignatureException", "InvalidSignatureException"}),
    "other algorithm": (lambda: {"tamper_headers": _edit_authorization(
        lambda a: a.replace("AWS4-HMAC-SHA256", "AWS4-HMAC-SHA512"))},
        {"IncompleteSignatureException"}),
    "garbage authorization": (lambda: {"tamper_headers": _set("Authorization", "Bearer abc")},
                              {"IncompleteSignatureException"}),
    "short credential": (lambda: {"tamper_headers": _edit_authorization(
        lambda a: a.replace("/aws4_request", ""))}, {"IncompleteSignatureException"}),
    "target changed after signing": (lambda: {"tamper_headers": _other_target},
                                     {"InvalidSignatureException"}),
    "date changed after signing": (_amz_date_shifted, {"InvalidSignatureException"}),
}


@SETTINGS
@given(variant=st.sampled_from(sorted(SIGV4_VARIANTS)),
       operation=st.sampled_from(["CreateKey", "DisableKey", "ScheduleKeyDeletion",
                                  "CreateAlias", "PutKeyPolicy"]),
       node=st.integers(0, 2))
def test_sigv4_variants_are_refused_and_change_nothing(fuzz: Fuzz, variant: str, operation: str,
                                                      node: int) -> None:
    key = fuzz.tracked[0]
    bodies = {"CreateKey": {"Description": "must not exist"}, "DisableKey": {"KeyId": key},
              "ScheduleKeyDeletion": {"KeyId": key, "PendingWindowInDays": 7},
              "CreateAlias": {"AliasName": "alias/must-not-exist", "TargetKeyId": key},
              "PutKeyPolicy": {"KeyId": key, "Policy": "{}", "PolicyName": "default"}}
    options, expected = SIGV4_VARIANTS[variant]
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op(operation, bodies[operation], **options()), node)
    check_refused(fuzz, answer, before, f"{operation} signed with {variant}")
    assert answer.error_type in expected, (variant, answer)


@SETTINGS
@given(changed=st.binary(min_size=0, max_size=200), node=st.integers(0, 2))
def test_a_signature_replayed_over_another_body_is_refused(fuzz: Fuzz, changed: bytes,
                                                           node: int) -> None:
    signed = json.dumps({"Description": "signed"}).encode()
    if changed == signed:
        return
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op("CreateKey", signed, send_body=changed), node)
    check_refused(fuzz, answer, before, f"a replay over {changed[:40]!r}")
    assert answer.error_type == "InvalidSignatureException", answer


def test_a_wrong_secret_is_refused(fuzz: Fuzz) -> None:
    creds = Credentials(fuzz.cluster.info["access_key_id"], "w" * 40)
    before = fuzz.fingerprint()
    answer = fuzz.send(fuzz.op("CreateKey", {"Description": "x"}, credentials=creds))
    check_refused(fuzz, answer, before, "a wrong secret")
    assert answer.error_type == "InvalidSignatureException", answer


# --- afterwards ---------------------------------------------------------------------------

def test_no_secret_reached_a_data_dir_log_or_audit_record(fuzz: Fuzz) -> None:
    """Runs last: every plaintext and data key that went over the wire in this module."""
    kms = fuzz.clients[0]
    for _ in range(5):  # a few known secrets, so the scan is never vacuous
        fuzz.secrets.append(kms.generate_data_key(KeyId=fuzz.sealing_key["KeyId"],
                                                  KeySpec="AES_256")["Plaintext"])
        plaintext = os.urandom(48)
        fuzz.secrets.append(plaintext)
        kms.encrypt(KeyId=fuzz.sealing_key["KeyId"], Plaintext=plaintext)
    # Every node's segment files are in its data dir; the API's rendering is read once.
    records: list[dict[str, Any]] = []
    while True:
        page = fuzz.cluster.admin(0, "GET", f"/v1/audit/records?after={len(records)}&limit=1000")
        if not page["Records"]:
            break
        records += page["Records"]
    import time
    started = time.monotonic()
    result = scan([fuzz.cluster.data_dir], fuzz.secrets,
                  {"audit records (API)": json.dumps(records).encode()})
    print(f"scan took {time.monotonic() - started:.1f} s")
    assert result.secrets >= 10 and result.files > 0
    assert result.hits == [], result.hits
    print(f"scanned {result.files} files, {result.bytes_scanned} bytes for {result.secrets} "
          f"secrets; answers seen: {dict(fuzz.answers)}; errors without a message: "
          f"{dict(fuzz.without_message)}")
