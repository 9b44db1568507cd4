#!/usr/bin/env python3
"""CPU cost of the pieces of one KMS API request, each timed in isolation with timeit.

A microbenchmark, not a test: it never asserts on time. It prints µs per call for

    log        the per-request access log line as KmsProtocol.handle writes it, with the
               production logging config (log_setup.configure), to /dev/null by default
               (--log-file PATH: to a regular file, as a node writes node.log); its write
               included, one write per line
    log_8_per_turn  the same when 8 requests end in one event-loop turn (the lines of a
               turn are written together since the access line skips structlog)
    log_error  one other structlog event (a warning), for comparison with the access line
    sigv4      SigV4Verifier.verify of a Decrypt signed by botocore, given header pairs
    authn      Authenticator.authenticate of the same Decrypt as an aiohttp request, as a
               node runs it: signed_request + verify + secret lookup + caller
    authz      Authorizer.check of Decrypt on a key with the default key policy, by the
               account's root (a RequestContext built per call included)
    authz_user the same by an IAM user whose identity policy allows Decrypt
    metrics    NodeMetrics.observe_request
    response   json_response of a Decrypt answer

The machine is shared, so each piece is timed --repeat times and the minimum is shown
(the run least disturbed by others). With --instructions it counts instructions per
call under valgrind's callgrind instead: steady whatever else runs, and slow (two runs
per piece, a few minutes in all). kmsd is imported from PYTHONPATH:

    PYTHONPATH=. .venv/bin/python bench/request_path_cost.py
    PYTHONPATH=. .venv/bin/python bench/request_path_cost.py --only log --log-file /tmp/x.log
    PYTHONPATH=. .venv/bin/python bench/request_path_cost.py --instructions

To compare with an older commit, export it (`git archive <rev> | tar -x -C /tmp/old`) and
run this same script with PYTHONPATH=/tmp/old; alternate the two a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCOUNT = "111122223333"
ACCESS_KEY, SECRET = "AKIABENCHREQUEST0001", "benchSecretKey/0123456789abcdefghijklmnopqr"
USER_KEY, USER_SECRET = "AKIABENCHREQUEST0002", "benchUserSecret/0123456789abcdefghijklmnop"
REGION = "us-east-1"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"
BLOB = b"\x01" * 160


def boto_signed_decrypt(host: str = "127.0.0.1:8000", access_key: str = ACCESS_KEY,
                        secret: str = SECRET) -> tuple[list[tuple[str, str]], bytes]:
    """Headers (Host first, as the HTTP client adds it) and body of a botocore-signed Decrypt."""
    import base64
    body = json.dumps({"CiphertextBlob": base64.b64encode(BLOB).decode()}).encode()
    request = AWSRequest(method="POST", url=f"http://{host}/", data=body, headers={
        "X-Amz-Target": "TrentService.Decrypt",
        "Content-Type": "application/x-amz-json-1.1",
        "User-Agent": "Boto3/1.44.8 md/Botocore#1.44.8 ua/2.1 os/linux#6.8 md/arch#x86_64 "
                      "lang/python#3.11.2 md/pyimpl#CPython cfg/retry-mode#legacy "
                      "Botocore/1.44.8"})
    SigV4Auth(Credentials(access_key, secret), "kms", REGION).add_auth(request)
    prepared = request.prepare()
    headers = [("Host", urlsplit(prepared.url).netloc), *prepared.headers.items(),
               ("Accept-Encoding", "identity")]
    return headers, body


class _Sealer:
    """Stands in for the HSM: the 'sealed' secret is the secret (the cache hit path never
    unseals; the first lookup of each access key does)."""

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        return blob


def _state() -> Any:
    from cluster.state import (
        AccessKeyRecord,
        BackingKey,
        KeyRecord,
        KmsState,
        PrincipalRecord,
    )
    from kmsd.service.keys import default_key_policy

    state = KmsState()
    root = f"arn:aws:iam::{ACCOUNT}:root"
    user = f"arn:aws:iam::{ACCOUNT}:user/bench"
    state.access_keys[ACCESS_KEY] = AccessKeyRecord(ACCESS_KEY, root, ACCOUNT,
                                                    SECRET.encode(), 0.0)
    state.access_keys[USER_KEY] = AccessKeyRecord(USER_KEY, user, ACCOUNT,
                                                  USER_SECRET.encode(), 0.0)
    identity = json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey*"],
        "Resource": "*"}]})
    state.principals[user] = PrincipalRecord(user, ACCOUNT, "user", "bench", 0.0,
                                             (("use-keys", identity),))
    state.keys[KEY_ID] = KeyRecord(
        key_id=KEY_ID, region=REGION, account_id=ACCOUNT, description="", key_usage=
        "ENCRYPT_DECRYPT", key_spec="SYMMETRIC_DEFAULT", origin="AWS_KMS",
        policy=default_key_policy(ACCOUNT), tags=(), created_at=0.0, key_state="Enabled",
        backing_keys=(BackingKey(1, b"w" * 40, 0.0),), epoch=1)
    return state


# -- the pieces ---------------------------------------------------------------------------

def piece_log(log_file: str | None, per_turn: int = 1) -> Callable[[], None]:
    """What KmsProtocol.handle does to log one answered request, in this version, with the
    lines written out every `per_turn` requests (as many as one event-loop turn ends)."""
    import structlog

    from kmsd import log_setup

    _redirect_stderr(log_file)
    log_setup.configure("node-1")
    request_id = "3f1b6c1e-5d0a-4c5e-9a57-0f6b2b1e8c11"
    principal = f"arn:aws:iam::{ACCOUNT}:root"
    started = time.perf_counter()
    calls = 0
    if hasattr(log_setup, "info_line"):   # since the access line skips structlog's chain
        def run() -> None:
            nonlocal calls
            token = log_setup.REQUEST_ID.set(request_id)
            elapsed = time.perf_counter() - started
            log_setup.info_line({
                "event": "request", "operation": "Decrypt", "outcome": "ok", "status": 200,
                "principal": principal, "keys": [KEY_ID], "ms": round(elapsed * 1000, 3),
                "source_ip": "127.0.0.1", "request_id": request_id})
            log_setup.REQUEST_ID.reset(token)
            calls += 1
            if calls % per_turn == 0:
                log_setup.flush()
        return run
    log = structlog.get_logger("kmsd.api")

    def run_structlog() -> None:
        structlog.contextvars.bind_contextvars(request_id=request_id)
        log.info("request", operation="Decrypt", outcome="ok", status=200, principal=principal,
                 keys=[KEY_ID], ms=round((time.perf_counter() - started) * 1000, 3),
                 source_ip="127.0.0.1")
        structlog.contextvars.unbind_contextvars("request_id")
    return run_structlog


def piece_log_8_per_turn(log_file: str | None) -> Callable[[], None]:
    return piece_log(log_file, per_turn=8)


def piece_log_error(log_file: str | None) -> Callable[[], None]:
    import structlog

    from kmsd import log_setup

    _redirect_stderr(log_file)
    log_setup.configure("node-1")
    log = structlog.get_logger("kmsd.api")
    flush = getattr(log_setup, "flush", lambda: None)   # one write per line, as before

    def run() -> None:
        log.warning("asymmetric_prune_failed", error="HsmError")
        flush()
    return run


def piece_sigv4() -> Callable[[], None]:
    from kmsd.auth.sigv4 import SignedRequest, SigV4Verifier

    headers, body = boto_signed_decrypt()
    signed = SignedRequest("POST", "/", "", tuple(headers), body)
    verifier = SigV4Verifier("kms", frozenset({REGION}))
    secrets = {ACCESS_KEY: SECRET}.get
    verifier.verify(signed, secrets)
    return lambda: verifier.verify(signed, secrets)


def _aiohttp_request() -> tuple[Any, bytes]:
    from aiohttp.test_utils import make_mocked_request
    from multidict import CIMultiDict, CIMultiDictProxy

    headers, body = boto_signed_decrypt()
    request = make_mocked_request("POST", "/", headers=CIMultiDictProxy(CIMultiDict(headers)))
    return request, body


def piece_authn() -> Callable[[], None]:
    from kmsd.api.protocol import Authenticator
    from kmsd.auth.credentials import CredentialStore
    from kmsd.auth.sigv4 import SigV4Verifier

    request, body = _aiohttp_request()
    authenticator = Authenticator(SigV4Verifier("kms", frozenset({REGION})),
                                  CredentialStore(_state(), _Sealer()))  # type: ignore[arg-type]
    authenticator.authenticate(request, body)
    return lambda: authenticator.authenticate(request, body)


def _piece_authz(principal: str, access_key: str) -> Callable[[], None]:
    from kmsd.auth.authorizer import Authorizer
    from kmsd.service.context import Caller, RequestContext

    state = _state()
    authorizer = Authorizer(state)
    record = state.keys[KEY_ID]
    params = {"CiphertextBlob": BLOB}

    def run() -> None:
        ctx = RequestContext("rid", REGION, Caller(access_key, principal, ACCOUNT),
                             "127.0.0.1", "Boto3/1.44.8", False)
        authorizer.check(ctx, "Decrypt", record, params)
    run()
    return run


def piece_authz() -> Callable[[], None]:
    return _piece_authz(f"arn:aws:iam::{ACCOUNT}:root", ACCESS_KEY)


def piece_authz_user() -> Callable[[], None]:
    return _piece_authz(f"arn:aws:iam::{ACCOUNT}:user/bench", USER_KEY)


def piece_metrics() -> Callable[[], None]:
    from kmsd.metrics import NodeFacts, NodeMetrics

    metrics = NodeMetrics(NodeFacts("node-1", "az-1", REGION, dict, list, lambda: (0, 0),
                                    lambda: None))
    return lambda: metrics.observe_request("Decrypt", "ok", 0.0012)


def piece_response() -> Callable[[], None]:
    from kmsd.api.protocol import json_response

    body = {"KeyId": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{KEY_ID}", "Plaintext": b"p" * 32,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "KeyMaterialId": "ab" * 32}
    return lambda: json_response(body, "3f1b6c1e-5d0a-4c5e-9a57-0f6b2b1e8c11")


PIECES: dict[str, Callable[..., Callable[[], None]]] = {
    "log": piece_log, "log_8_per_turn": piece_log_8_per_turn, "log_error": piece_log_error,
    "sigv4": piece_sigv4,
    "authn": piece_authn, "authz": piece_authz, "authz_user": piece_authz_user,
    "metrics": piece_metrics, "response": piece_response,
}
LOGGING = ("log", "log_8_per_turn", "log_error")


_stderr_redirected = False


def _redirect_stderr(log_file: str | None) -> None:
    """Point file descriptor 2 at /dev/null (or the log file), so sys.stderr stays the very
    object (line-buffered, as in a node whose stderr is a file) that logging writes to."""
    global _stderr_redirected
    if _stderr_redirected:
        return
    fd = os.open(log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.close(fd)
    _stderr_redirected = True


def measure(fn: Callable[[], None], number: int, repeat: int) -> float:
    """Minimum µs per call over `repeat` runs of `number` calls, timed inside a running loop
    so that code which looks for the running loop finds one (as in a node)."""
    async def runs() -> list[float]:
        timer = timeit.Timer(fn)
        out = []
        for _ in range(repeat):
            out.append(timer.timeit(number))
            await asyncio.sleep(0)   # let anything the pieces scheduled run, as a node would
        return out
    return min(asyncio.run(runs())) / number * 1e6


def instructions(name: str, number: int, log_file: str | None) -> float:
    """Instructions per call: two callgrind runs of this script, with `number` and 6 x
    `number` calls; their difference over the extra calls leaves out start-up and set-up."""
    totals = []
    for calls in (number, 6 * number):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "callgrind.out")
            command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                       sys.executable, os.path.abspath(__file__), "--only", name,
                       "--number", str(calls), "--repeat", "1"]
            if log_file:
                command += ["--log-file", log_file]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=3600,
                           env={**os.environ, "PYTHONHASHSEED": "0"})
            with open(out) as handle:
                totals.append(next(int(line.split()[1]) for line in handle
                                   if line.startswith(("summary:", "totals:"))))
    return (totals[1] - totals[0]) / (5 * number)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated pieces: " + ",".join(PIECES))
    parser.add_argument("--number", type=int,
                        help="calls per timing run (2000), or in the shorter callgrind run "
                             "(200)")
    parser.add_argument("--repeat", type=int, default=15, help="timing runs; min is shown")
    parser.add_argument("--log-file", help="log to this file rather than /dev/null")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per call under callgrind")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(PIECES)
    for name in names:
        if args.instructions:
            count = instructions(name, args.number or 200, args.log_file)
            print(f"{name:<15} {count:10.0f} instructions/call", flush=True)
            continue
        maker = PIECES[name]
        fn = maker(args.log_file) if name in LOGGING else maker()
        per_call = measure(fn, args.number or 2000, args.repeat)
        print(f"{name:<15} {per_call:8.2f} µs/call", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
