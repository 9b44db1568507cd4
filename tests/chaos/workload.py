"""The chaos workload: client threads calling the KMS API through boto3, and the ledger
of everything they asked for and were told.

Each worker is bound to one node and owns the keys it creates: it encrypts, decrypts
(checking the plaintext at once), generates data keys, creates aliases and grants,
disables and re-enables, and rotates on demand. Every write carries a name unique to
the run (the key's Description, the alias name, the grant Name), so the checks can
tell a key, alias or grant that a client asked for, even one whose answer was lost,
from one that nobody asked for.

Every HTTP attempt the SDK makes is recorded through botocore's `response-received`
event: the request id of each answered attempt (retries included), and the attempts
that got no answer at all. A call is *acknowledged* when it succeeded, *refused* when
the service answered a definite 4xx, and *ambiguous* when some attempt got a 5xx or no
answer: such a write may or may not have been applied.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from tests.integration.harness import Cluster

GRANTEE = "arn:aws:iam::{account}:user/chaos-grantee"
AUDIT_UNAVAILABLE = "The request could not be recorded in the audit log"
WRITE_OPS = frozenset({"CreateKey", "CreateAlias", "CreateGrant", "DisableKey", "EnableKey",
                       "RotateKeyOnDemand"})
# Op and weight; a worker without a usable key creates one first.
OP_WEIGHTS = (("Encrypt", 24), ("Decrypt", 20), ("GenerateDataKey", 14), ("CreateKey", 6),
              ("CreateAlias", 6), ("CreateGrant", 6), ("DisableKey", 5), ("EnableKey", 0),
              ("RotateKeyOnDemand", 4))
MAX_KEYS_PER_WORKER = 15
MAX_ROTATIONS_PER_KEY = 8  # below kmsd's on-demand limit, so LimitExceeded is not the norm


@dataclass
class Attempt:
    request_id: str | None
    status: int | None
    error_code: str | None
    message: str = ""
    exception: str | None = None  # a transport error: no answer

    @property
    def answered(self) -> bool:
        return self.status is not None

    @property
    def unrecorded(self) -> bool:
        """Answered with the fail-closed refusal: its audit record may be missing."""
        return self.error_code == "KMSInternalException" and \
            self.message.startswith(AUDIT_UNAVAILABLE)


@dataclass
class Call:
    op: str
    node: int
    worker: int
    started: float
    ended: float = 0.0
    outcome: str = "ok"  # "ok", an AWS error code, or a transport error class name
    attempts: list[Attempt] = field(default_factory=list)
    name: str = ""  # the unique name of a write (description, alias, grant name)
    key_id: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def ambiguous(self) -> bool:
        """Some attempt got a 5xx or no answer: a write may have been applied anyway."""
        return any(a.status is None or a.status >= 500 for a in self.attempts)

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        last = self.attempts[-1] if self.attempts else None
        if last is not None and last.status is not None and last.status < 500:
            return "refused"
        return "unavailable"


@dataclass
class Sealed:
    ciphertext: bytes
    plaintext: bytes
    context: dict[str, str]
    key_id: str
    source: str  # Encrypt or GenerateDataKey


@dataclass
class Ledger:
    """Everything the workload asked for and was told. Lists are appended under `lock`."""

    run: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: list[Call] = field(default_factory=list)
    sealed: list[Sealed] = field(default_factory=list)
    secrets: list[bytes] = field(default_factory=list)
    # Mismatches seen by the workers themselves (a Decrypt returning other bytes).
    violations: list[str] = field(default_factory=list)

    def add(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)


class _AttemptRecorder:
    """Collects the attempts of the call in progress on one client (one thread)."""

    def __init__(self) -> None:
        self.current: list[Attempt] = []

    def __call__(self, response_dict: dict[str, Any] | None = None,
                 parsed_response: dict[str, Any] | None = None,
                 exception: Exception | None = None, **_: Any) -> None:
        if response_dict is None:
            self.current.append(Attempt(None, None, None,
                                        exception=type(exception).__name__ if exception
                                        else "NoResponse"))
            return
        headers = {k.lower(): v for k, v in response_dict.get("headers", {}).items()}
        error = (parsed_response or {}).get("Error", {})
        self.current.append(Attempt(headers.get("x-amzn-requestid"),
                                    response_dict.get("status_code"),
                                    error.get("Code") or None, error.get("Message", "") or ""))


def make_client(cluster: Cluster, node: int, attempts: int = 3, read_timeout: float = 8.0
                ) -> tuple[Any, _AttemptRecorder]:
    client = boto3.session.Session().client(
        "kms", endpoint_url=cluster.info["endpoints"][node], region_name=cluster.region,
        aws_access_key_id=cluster.info["access_key_id"],
        aws_secret_access_key=cluster.info["secret_access_key"],
        config=Config(retries={"max_attempts": attempts, "mode": "standard"},
                      connect_timeout=3, read_timeout=read_timeout, tcp_keepalive=True))
    recorder = _AttemptRecorder()
    client.meta.events.register("response-received.kms.*", recorder)
    return client, recorder


@dataclass
class OwnedKey:
    key_id: str
    arn: str
    enabled: bool = True
    state_known: bool = True
    rotations: int = 0


class Worker(threading.Thread):
    def __init__(self, index: int, node: int, cluster: Cluster, ledger: Ledger,
                 stop: threading.Event, deadline: float, max_calls: int, seed: int) -> None:
        super().__init__(name=f"chaos-worker-{index}", daemon=True)
        self.index = index
        self.node = node
        self.ledger = ledger
        self.stop = stop
        self.deadline = deadline
        self.max_calls = max_calls
        self.rng = random.Random(seed)
        self.account = cluster.info["account_id"]
        self.client, self.recorder = make_client(cluster, node)
        self.keys: list[OwnedKey] = []
        self.sealed: list[Sealed] = []
        self.counter = 0
        self.error: BaseException | None = None
        self.last: Call | None = None

    def run(self) -> None:
        try:
            calls = 0
            while not self.stop.is_set() and time.monotonic() < self.deadline \
                    and calls < self.max_calls:
                failed = self.step()
                calls += 1
                # A client that got no service backs off a little, as an application would.
                self.stop.wait(self.rng.uniform(0.2, 0.5) if failed else
                               self.rng.uniform(0.0, 0.02))
        except BaseException as exc:  # noqa: BLE001 - reported by the runner
            self.error = exc

    def _unique(self, kind: str) -> str:
        self.counter += 1
        return f"chaos-{self.ledger.run}-{kind}-w{self.index}-{self.counter}"

    def _call(self, op: str, fn: Callable[[], dict[str, Any]], name: str = "",
              key_id: str = "") -> tuple[Call, dict[str, Any] | None]:
        call = Call(op, self.node, self.index, time.time(), name=name, key_id=key_id)
        self.recorder.current = []
        response: dict[str, Any] | None = None
        try:
            response = fn()
        except ClientError as error:
            call.outcome = error.response.get("Error", {}).get("Code") or "ClientError"
        except BotoCoreError as error:
            call.outcome = type(error).__name__
        call.ended = time.time()
        call.attempts = self.recorder.current
        self.recorder.current = []
        self.ledger.add(call)
        self.last = call
        return call, response

    def _usable(self) -> list[OwnedKey]:
        return [k for k in self.keys if k.enabled and k.state_known]

    def step(self) -> bool:
        """One call; True when the service was unavailable for it."""
        self.last = None
        self._step()
        return self.last is not None and self.last.status == "unavailable"

    def _step(self) -> None:
        usable = self._usable()
        if not usable and len(self.keys) < MAX_KEYS_PER_WORKER:
            self.create_key()
            return
        unknown = [k for k in self.keys if not k.state_known or not k.enabled]
        if unknown and (not usable or self.rng.random() < 0.5):
            self.enable(self.rng.choice(unknown))
            return
        if not usable:
            return
        ops, weights = zip(*OP_WEIGHTS, strict=True)
        op = self.rng.choices(ops, weights)[0]
        key = self.rng.choice(usable)
        if op == "Encrypt":
            self.encrypt(key)
        elif op == "Decrypt":
            # A blob under a key this worker holds enabled (a few tries, then encrypt).
            usable_ids = {k.key_id for k in usable}
            picks = [self.rng.choice(self.sealed) for _ in range(5)] if self.sealed else []
            sealed = next((s for s in picks if s.key_id in usable_ids), None)
            if sealed is not None:
                self.decrypt(sealed)
            else:
                self.encrypt(key)
        elif op == "GenerateDataKey":
            self.generate_data_key(key)
        elif op == "CreateKey" and len(self.keys) < MAX_KEYS_PER_WORKER:
            self.create_key()
        elif op == "CreateAlias":
            self.create_alias(key)
        elif op == "CreateGrant":
            self.create_grant(key)
        elif op == "DisableKey" and len(usable) > 1:
            self.disable(key)
        elif op == "RotateKeyOnDemand" and key.rotations < MAX_ROTATIONS_PER_KEY:
            self.rotate(key)
        else:
            self.encrypt(key)

    # The operations.
    def create_key(self) -> None:
        name = self._unique("key")
        call, response = self._call("CreateKey",
                                    lambda: self.client.create_key(Description=name), name=name)
        if response is not None:
            meta = response["KeyMetadata"]
            call.key_id = meta["KeyId"]
            self.keys.append(OwnedKey(meta["KeyId"], meta["Arn"]))

    def encrypt(self, key: OwnedKey) -> None:
        plaintext = os.urandom(32)
        context = {"chaos-run": self.ledger.run, "worker": str(self.index)}
        with self.ledger.lock:
            self.ledger.secrets.append(plaintext)
        call, response = self._call("Encrypt", lambda: self.client.encrypt(
            KeyId=key.key_id, Plaintext=plaintext, EncryptionContext=context),
            key_id=key.key_id)
        if response is not None:
            self._sealed(Sealed(response["CiphertextBlob"], plaintext, context, key.key_id,
                                "Encrypt"))
        else:
            self._note_state(key, call)

    def generate_data_key(self, key: OwnedKey) -> None:
        context = {"chaos-run": self.ledger.run, "data-key": "1"}
        call, response = self._call("GenerateDataKey", lambda: self.client.generate_data_key(
            KeyId=key.key_id, KeySpec="AES_256", EncryptionContext=context), key_id=key.key_id)
        if response is not None:
            with self.ledger.lock:
                self.ledger.secrets.append(response["Plaintext"])
            self._sealed(Sealed(response["CiphertextBlob"], response["Plaintext"], context,
                                key.key_id, "GenerateDataKey"))
        else:
            self._note_state(key, call)

    def decrypt(self, sealed: Sealed) -> None:
        call, response = self._call("Decrypt", lambda: self.client.decrypt(
            CiphertextBlob=sealed.ciphertext, EncryptionContext=sealed.context),
            key_id=sealed.key_id)
        if response is not None and response["Plaintext"] != sealed.plaintext:
            with self.ledger.lock:
                self.ledger.violations.append(
                    f"Decrypt {call.attempts[-1].request_id} on node {self.node} returned other"
                    f" bytes than were sealed under {sealed.key_id}")
        if response is None:
            for key in self.keys:
                if key.key_id == sealed.key_id:
                    self._note_state(key, call)

    def create_alias(self, key: OwnedKey) -> None:
        name = "alias/" + self._unique("alias")
        self._call("CreateAlias", lambda: self.client.create_alias(
            AliasName=name, TargetKeyId=key.key_id), name=name, key_id=key.key_id)

    def create_grant(self, key: OwnedKey) -> None:
        name = self._unique("grant")
        call, response = self._call("CreateGrant", lambda: self.client.create_grant(
            KeyId=key.key_id, GranteePrincipal=GRANTEE.format(account=self.account),
            Operations=["Encrypt", "Decrypt"], Name=name), name=name, key_id=key.key_id)
        if response is not None:
            call.name = f"{name}|{response['GrantId']}"

    def disable(self, key: OwnedKey) -> None:
        call, _ = self._call("DisableKey", lambda: self.client.disable_key(KeyId=key.key_id),
                             key_id=key.key_id)
        if call.ok:
            key.enabled = False
        elif call.ambiguous:
            key.state_known = False

    def enable(self, key: OwnedKey) -> None:
        call, _ = self._call("EnableKey", lambda: self.client.enable_key(KeyId=key.key_id),
                             key_id=key.key_id)
        if call.ok:
            key.enabled, key.state_known = True, True
        elif not call.ambiguous:
            key.state_known = False

    def rotate(self, key: OwnedKey) -> None:
        call, _ = self._call("RotateKeyOnDemand",
                             lambda: self.client.rotate_key_on_demand(KeyId=key.key_id),
                             key_id=key.key_id)
        if call.ok or call.ambiguous:
            key.rotations += 1

    def _sealed(self, sealed: Sealed) -> None:
        self.sealed.append(sealed)
        with self.ledger.lock:
            self.ledger.sealed.append(sealed)

    def _note_state(self, key: OwnedKey, call: Call) -> None:
        if call.outcome in ("DisabledException", "KMSInvalidStateException"):
            key.state_known = False


def start_workers(cluster: Cluster, ledger: Ledger, count: int, stop: threading.Event,
                  deadline: float, max_calls: int, seed: int) -> list[Worker]:
    # Clients are made here, one by one: boto3 session set-up is not thread-safe.
    workers = [Worker(i, i % cluster.size, cluster, ledger, stop, deadline, max_calls,
                      seed * 1000 + i) for i in range(count)]
    for worker in workers:
        worker.start()
    return workers
