"""The Raft port's AES-GCM wire (cluster/raft_wire.py): only holders of the cluster secret
can read or send, a tampered or replayed message is refused, and a real 3-node pysyncobj
cluster over 127.0.0.1 still replicates through it."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import time
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from pysyncobj import SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.utility import TcpUtility, UtilityException

from cluster import raft_wire
from cluster.raft_wire import AeadEncryptor
from cluster.syncobj_guard import GuardedSyncObj

SECRET = "the-cluster-secret"


@pytest.fixture(scope="module")
def pair() -> tuple[AeadEncryptor, AeadEncryptor]:
    # Two ends that share the secret (PBKDF2 at 100k iterations: build them once).
    return AeadEncryptor(SECRET), AeadEncryptor(SECRET)


def test_a_message_round_trips_and_its_stamp_grows(pair: tuple[AeadEncryptor, AeadEncryptor]
                                                   ) -> None:
    sender, receiver = pair
    first = sender.encrypt_at_time(b"first message", 1)
    second = sender.encrypt_at_time(b"second message", 1)
    assert receiver.extract_timestamp(second) > receiver.extract_timestamp(first)
    assert receiver.decrypt(first) == b"first message"
    assert receiver.decrypt(second) == b"second message"


def test_the_plaintext_is_not_on_the_wire(pair: tuple[AeadEncryptor, AeadEncryptor]) -> None:
    sender, _ = pair
    token = sender.encrypt_at_time(b"wrapped-key-material" * 4, 1)
    assert b"wrapped-key-material" not in token
    # Fresh sender keys and nonces: the same plaintext never gives the same bytes.
    assert token != sender.encrypt_at_time(b"wrapped-key-material" * 4, 1)


def test_a_wrong_secret_cannot_decrypt(pair: tuple[AeadEncryptor, AeadEncryptor]) -> None:
    sender, _ = pair
    with pytest.raises(InvalidTag):
        AeadEncryptor("not-the-secret").decrypt(sender.encrypt_at_time(b"status", 1))


@pytest.mark.parametrize("position", [0, 1, 17, 24, 25, 40, -1])
def test_a_tampered_message_is_refused(pair: tuple[AeadEncryptor, AeadEncryptor],
                                       position: int) -> None:
    # Version, sender id, counter, ciphertext and tag: every byte is authenticated.
    sender, receiver = pair
    token = bytearray(sender.encrypt_at_time(b"x" * 32, 1))
    token[position] ^= 0x01
    with pytest.raises(InvalidTag):
        receiver.decrypt(bytes(token))


def test_a_truncated_message_is_refused(pair: tuple[AeadEncryptor, AeadEncryptor]) -> None:
    sender, receiver = pair
    token = sender.encrypt_at_time(b"x" * 32, 1)
    for length in (0, 10, 25, 40, len(token) - 1):
        with pytest.raises(InvalidTag):
            receiver.decrypt(token[:length])


def test_a_replayed_or_reordered_message_is_refused(
        pair: tuple[AeadEncryptor, AeadEncryptor]) -> None:
    sender, receiver = pair
    older, newer = sender.encrypt_at_time(b"a", 1), sender.encrypt_at_time(b"b", 1)
    assert receiver.decrypt(newer) == b"b"
    with pytest.raises(InvalidTag):
        receiver.decrypt(newer)
    with pytest.raises(InvalidTag):
        receiver.decrypt(older)


def test_a_forked_child_encrypts_under_a_key_of_its_own(
        pair: tuple[AeadEncryptor, AeadEncryptor], monkeypatch: pytest.MonkeyPatch) -> None:
    # The dump child pysyncobj forks must never reuse the parent's (key, nonce) pairs.
    sender, receiver = pair
    parent = sender.encrypt_at_time(b"parent", 1)
    monkeypatch.setattr(raft_wire.os, "getpid", lambda: -1)
    child = sender.encrypt_at_time(b"child", 1)
    assert child[1:17] != parent[1:17]  # another sender id, so another key
    assert receiver.decrypt(child) == b"child"
    assert receiver.decrypt(parent) == b"parent"  # each sender's counters stand apart


# -- over real sockets ---------------------------------------------------------------------

class _Register(SyncObjConsumer):
    def __init__(self) -> None:
        super().__init__()
        self.values: list[bytes] = []

    @replicated
    def append(self, value: bytes) -> int:
        self.values.append(value)
        return len(self.values)


def _cluster(ports: list[int], secrets: list[str]) -> list[tuple[GuardedSyncObj, _Register]]:
    raft_wire.install()
    nodes = []
    for port, secret in zip(ports, secrets, strict=True):
        register = _Register()
        conf = SyncObjConf(password=secret, appendEntriesUseBatch=False,
                           dynamicMembershipChange=True)
        node = GuardedSyncObj(f"127.0.0.1:{port}", [f"127.0.0.1:{p}" for p in ports if p != port],
                              conf=conf, consumers=[register],
                              encryptor=AeadEncryptor(secret))
        nodes.append((node, register))
    return nodes


def _wait(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _leader(nodes: list[tuple[GuardedSyncObj, _Register]]) -> tuple[GuardedSyncObj, _Register]:
    _wait(lambda: any(n._isLeader() for n, _ in nodes), 20, "a leader is elected")
    return next((n, r) for n, r in nodes if n._isLeader())


@pytest.fixture(scope="module")
def cluster() -> Any:
    nodes = _cluster([21760, 21761, 21762], [SECRET] * 3)
    try:
        yield nodes
    finally:
        for node, _ in nodes:
            node.destroy()


def test_a_three_node_cluster_replicates_over_the_wire(cluster: Any) -> None:
    leader, register = _leader(cluster)
    results: list[Any] = []
    payloads = [os.urandom(3000) for _ in range(20)]
    for payload in payloads:
        register.append(payload, callback=lambda result, error: results.append(error))
    _wait(lambda: len(results) == len(payloads), 20, "the commands commit")
    assert results == [0] * len(payloads)
    _wait(lambda: all(r.values == payloads for _, r in cluster), 20, "every node applies them")


def _port_of(node: GuardedSyncObj) -> int:
    return int(node.selfNode.address.rsplit(":", 1)[1])


def test_the_admin_port_answers_only_this_wire_with_the_secret(cluster: Any) -> None:
    address = cluster[0][0].selfNode.address
    assert raft_wire.utility(SECRET, timeout=5).executeCommand(address, ["status"])["state"] \
        in (0, 1, 2)
    with pytest.raises(UtilityException):
        raft_wire.utility("not-the-secret", timeout=3).executeCommand(address, ["status"])
    # pysyncobj's own client, even with the right secret, speaks Fernet: mixed versions
    # cannot talk.
    with pytest.raises(UtilityException):
        TcpUtility(password=SECRET, timeout=3).executeCommand(address, ["status"])


def _frame(token: bytes) -> bytes:
    return struct.pack("i", len(token)) + token


def _read_frame(sock: socket.socket) -> bytes | None:
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack("i", data[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data[4:]


@pytest.mark.parametrize("tamper", [False, True])
def test_a_tampered_message_on_the_port_closes_the_connection(cluster: Any,
                                                             tamper: bool) -> None:
    # The handshake of pysyncobj's transport, by hand: random keys each way, then a
    # utility command bound to the node's key. Flip one bit of that command and the node
    # drops the connection without answering.
    encryptor = AeadEncryptor(SECRET)
    with socket.create_connection(("127.0.0.1", _port_of(cluster[0][0])), timeout=5) as sock:
        sock.sendall(_frame(encryptor.encrypt_at_time(pickle.dumps(os.urandom(32)), 0)))
        reply = _read_frame(sock)
        assert reply is not None
        _our_key, node_key = pickle.loads(encryptor.decrypt(reply))
        token = bytearray(encryptor.encrypt_at_time(pickle.dumps((node_key, ["status"])), 0))
        if tamper:
            token[-5] ^= 0x40
        sock.sendall(_frame(bytes(token)))
        answer = _read_frame(sock)
    if tamper:
        assert answer is None
    else:
        assert answer is not None
        assert pickle.loads(encryptor.decrypt(answer))[1]["state"] in (0, 1, 2)


def test_a_node_with_another_secret_connects_to_no_one() -> None:
    nodes = _cluster([21765, 21766, 21767], [SECRET, SECRET, "another-secret"])
    try:
        (first, _), (second, _), (stranger, _) = nodes
        _leader(nodes[:2])
        _wait(lambda: first.isNodeConnected(second.selfNode), 10, "the two with the secret")
        time.sleep(2)  # several reconnection attempts
        assert not stranger._isLeader()
        for node in (first, second):
            assert not node.isNodeConnected(stranger.selfNode)
            assert not stranger.isNodeConnected(node.selfNode)
    finally:
        for node, _ in nodes:
            node.destroy()
