"""Starting and driving real kmsd clusters from tests: `kmsd dev` subprocesses,
SoftHSM2 tokens in temporary folders, boto3 clients, kill and restart of nodes."""

from __future__ import annotations

import codecs
import gzip
import json
import os
import random
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

T = TypeVar("T")


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


# Ports the unit tests bind by number (a Raft node, a hub): a cluster that outlives its
# module (the session's) must not hold one of them when they run.
UNIT_TEST_PORTS = range(21700, 21900)


def free_base_port(nodes: int) -> int:
    for _ in range(200):
        # Below the kernel's ephemeral range (32768+), where client sockets would collide.
        base = random.randrange(15000, 32400, 10)
        ports = [base + offset + i for offset in (0, 100, 200) for i in range(nodes)]
        if not any(port in UNIT_TEST_PORTS for port in ports) and _ports_free(ports):
            return base
    raise RuntimeError("no free port range")


def wait_for(predicate: Callable[[], T], timeout: float, interval: float = 0.1,
             what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            # None and False mean "not yet"; anything else (node index 0 included) is the answer.
            if value is not None and value is not False:
                return value
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last error: {last_error!r}")


@dataclass
class Cluster:
    info: dict[str, Any]
    process: subprocess.Popen
    data_dir: str
    extra_processes: list[subprocess.Popen] = field(default_factory=list)
    # Every plaintext and data key a test saw, for the scan of the data dirs.
    secrets_seen: list[bytes] = field(default_factory=list)

    @property
    def region(self) -> str:
        return self.info["region"]

    @property
    def size(self) -> int:
        return len(self.info["endpoints"])

    def credentials(self) -> Credentials:
        return Credentials(self.info["access_key_id"], self.info["secret_access_key"])

    def client(self, node: int, *, access_key_id: str | None = None,
               secret_access_key: str | None = None, region: str | None = None,
               retries: int = 2) -> Any:
        return boto3.client(
            "kms", endpoint_url=self.info["endpoints"][node],
            region_name=region or self.region,
            aws_access_key_id=access_key_id or self.info["access_key_id"],
            aws_secret_access_key=secret_access_key or self.info["secret_access_key"],
            verify=self.info.get("ca_bundle") or None,
            config=Config(retries={"max_attempts": retries, "mode": "standard"},
                          connect_timeout=3, read_timeout=15))

    @property
    def ssl_context(self) -> ssl.SSLContext | None:
        bundle = self.info.get("ca_bundle")
        return ssl.create_default_context(cafile=bundle) if bundle else None

    def admin_get(self, node: int, path: str) -> dict[str, Any]:
        return self.admin(node, "GET", path)

    def admin(self, node: int, method: str, path: str, body: bytes = b"",
              credentials: Credentials | None = None) -> dict[str, Any]:
        """A signed admin API call; an HTTP error is raised as urllib's HTTPError."""
        url = self.info["admin_endpoints"][node] + path
        request = AWSRequest(method=method, url=url, data=body)
        SigV4Auth(credentials or self.credentials(), "kms", self.region).add_auth(request)
        prepared = request.prepare()
        http = urllib.request.Request(url, data=body or None, headers=dict(prepared.headers),
                                      method=method)
        with urllib.request.urlopen(http, timeout=10, context=self.ssl_context) as response:
            return json.loads(response.read())

    def new_user(self, name: str, policy: dict[str, Any] | None = None) -> dict[str, str]:
        """Create a user (and optionally attach an identity policy); returns its access key."""
        self.admin(0, "POST", "/v1/principals",
                   json.dumps({"Kind": "user", "Name": name}).encode())
        if policy is not None:
            self.admin(0, "PUT", f"/v1/principals/user/{name}/policies/main",
                       json.dumps(policy).encode())
        key = self.admin(0, "POST", f"/v1/principals/user/{name}/access-keys")
        self.secrets_seen.append(key["SecretAccessKey"].encode())
        user = {"arn": f"arn:aws:iam::{self.info['account_id']}:user/{name}",
                "access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}
        for node in range(self.size):  # known everywhere before the test goes on
            wait_for(lambda n=node: self._recognised(n, user), 10, what="the new access key")
        return user

    def _recognised(self, node: int, user: dict[str, str]) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.as_user(node, user).list_aliases(Limit=1)
        except ClientError as error:
            return error.response["Error"]["Code"] == "AccessDeniedException"
        return True

    def as_user(self, node: int, user: dict[str, str]) -> Any:
        return self.client(node, access_key_id=user["access_key_id"],
                           secret_access_key=user["secret_access_key"], retries=1)

    def node_status(self, node: int) -> dict[str, Any] | None:
        try:
            return self.admin_get(node, "/v1/node/status")
        except (urllib.error.URLError, OSError):
            return None

    def leader(self, among: list[int] | None = None) -> int | None:
        for node in among if among is not None else range(self.size):
            status = self.node_status(node)
            if status and status["raft"]["role"] == "leader" and status["raft"]["has_quorum"]:
                return node
        return None

    def ready(self, node: int) -> bool:
        try:
            with urllib.request.urlopen(self.info["endpoints"][node] + "/readyz",
                                        timeout=1, context=self.ssl_context) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def pid(self, node: int) -> int:
        return self.info["pids"][node]

    def kill(self, node: int) -> None:
        os.kill(self.pid(node), signal.SIGKILL)
        wait_for(lambda: not _alive(self.pid(node)), 10, what=f"node {node} to die")

    def restart(self, node: int, wait: bool = True) -> None:
        config = self.info["configs"][node]
        log = open(os.path.join(os.path.dirname(config), "node.log"), "ab")  # noqa: SIM115
        process = subprocess.Popen([sys.executable, "-m", "kmsd.cli", "serve", "--config", config],
                                   stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.extra_processes.append(process)
        self.info["pids"][node] = process.pid
        if wait:
            wait_for(lambda: self.ready(node), 60, what=f"node {node} to be ready again")

    def stop(self) -> None:
        for process in self.extra_processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        for process in [*self.extra_processes, self.process]:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until reaped; count zombies as dead.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def start_cluster(data_dir: str, nodes: int = 3, extra_args: tuple[str, ...] = (),
                  timeout: float = 90.0, env: dict[str, str] | None = None) -> Cluster:
    base = free_base_port(nodes)
    process = subprocess.Popen(
        [sys.executable, "-m", "kmsd.cli", "dev", "--nodes", str(nodes), "--data-dir", data_dir,
         "--port", str(base), *extra_args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})})
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else b""
    if not line:
        process.kill()
        _, err = process.communicate(timeout=10)
        raise RuntimeError(f"kmsd dev did not start: {err.decode(errors='replace')[-3000:]}")
    return Cluster(info=json.loads(line), process=process, data_dir=data_dir)


_ZERO_ABOVE_LATIN1 = "kmsd-zero-above-latin1"
codecs.register_error(_ZERO_ABOVE_LATIN1,
                      lambda error: ("\x00" * (error.end - error.start), error.end))


def stored_views(path: str) -> list[bytes]:
    """A file's bytes as stored, and as they read after undoing the encodings that
    kmsd's storage applies: gzip (Raft snapshots) and Python pickle protocol 2,
    which stores `bytes` as the UTF-8 encoding of their latin-1 text (Raft journal);
    in that last view every character above U+00FF reads as one zero byte (made by a
    codec error handler: fast enough for the tens of megabytes a chaos run leaves)."""
    with open(path, "rb") as handle:
        raw = handle.read()
    views = [raw]
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
        views.append(raw)
    views.append(raw.decode("utf-8", "replace").encode("latin-1", _ZERO_ABOVE_LATIN1))
    return views


DAY = 86400


def advance_clock(cluster: Cluster, days: float) -> None:
    """Move every node's proposer clock forward (clusters started with --test-clock)."""
    cluster.info["offset"] = cluster.info.get("offset", 0.0) + days * DAY
    for path in cluster.info["clock_offset_files"]:
        with open(path, "w") as handle:
            handle.write(str(cluster.info["offset"]))


def error_of(call: Callable[[], Any]) -> tuple[str, str]:
    """The AWS error code and message a call fails with (it must fail)."""
    import pytest
    from botocore.exceptions import ClientError

    with pytest.raises(ClientError) as excinfo:
        call()
    error = excinfo.value.response["Error"]
    return error["Code"], error.get("Message", "")
