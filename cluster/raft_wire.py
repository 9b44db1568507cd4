"""How messages on the Raft port are protected: AES-256-GCM under a key derived from the
cluster secret, in place of pysyncobj's Fernet, and no zlib.

pysyncobj 0.3.17's TcpConnection sends a message as
`encryptor.encrypt_at_time(zlib.compress(pickle.dumps(message), 3), t)` and reads one as
`pickle.loads(zlib.decompress(encryptor.decrypt(token)))` after checking that
`encryptor.extract_timestamp(token)` did not go backwards on that connection. With
`password` set, the encryptor is Fernet (AES-128-CBC, HMAC-SHA256, base64), and every
message is compressed first. Measured per message (bench/raft_batch_cost.py and the
figures in the commit that introduced this module): zlib.compress costs ~12 µs even for
a 160-byte acknowledgement (it sets up a fresh deflate state each call) and ~50 µs for a
10-record audit entry; Fernet costs ~17-22 µs to encrypt and ~26-46 µs to check and
decrypt (it base64-decodes and verifies the HMAC twice: once for the timestamp, once
for the data). AES-GCM over the raw bytes costs 1-3 µs either way.

What stays the same: the Raft port is authenticated and confidential under the cluster
secret, a peer without it can neither read nor send anything (pickle is only ever loaded
from a message that authenticated), and pysyncobj's handshake still binds every message
to its connection with the 32-byte random keys the two ends exchange.

The construction:
- master key: PBKDF2-HMAC-SHA256 of the secret, 100,000 iterations, 32 bytes: the same
  work factor as pysyncobj's Fernet key, with its own fixed salt, so the two keys differ.
- each encryptor (one per SyncObj, renewed in a forked child) draws a random 128-bit
  sender id and encrypts under its own key HKDF-SHA256(master, salt=sender id). Its
  nonce is a counter, so no nonce ever repeats under a key and there is no birthday
  bound on the number of messages, however long the cluster secret lives. A random
  96-bit nonce under the one master key would have been safe for ~2^32 messages only,
  which a busy cluster sends in weeks.
- token = version (1 byte) || sender id (16) || counter (8, big-endian) || ciphertext and
  tag; the header is the associated data, so none of it can be altered.
- the counter is also what pysyncobj checks as the "timestamp" (no message on a
  connection may carry a smaller one than the one before), so an old message can no
  longer be replayed within the second that Fernet's whole-second stamps allowed; a
  receiver also refuses a counter it has already accepted from that sender (a peer
  keeps counting across its reconnections), so not even the latest message is
  accepted twice.
- messages are pickled with protocol 5 rather than pysyncobj's 2 (see _PICKLE_PROTOCOL).
- no compression: besides its CPU, compressing secret-bearing bytes together with
  bytes an attacker chooses (request fields in audit records) before encrypting leaks
  through the ciphertext length. An audit record takes ~1.3 KB on the wire instead
  of ~210 bytes: at 5,000 records/s, ~6 MB/s from the leader to each follower.

Mixed versions cannot talk: a node running this module and one running pysyncobj's
Fernet (or an older kmsd) refuse each other's messages and never connect. Upgrade
every node of a cluster together (stop all, start all). pysyncobj's own TcpUtility
(`syncobj_admin`) speaks Fernet; `utility()` below builds one that speaks this.
"""

from __future__ import annotations

import itertools
import os
import pickle
import struct
import types
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

VERSION = b"\x01"
_SALT = b"kmsd raft wire v1 master key"
_ITERATIONS = 100_000  # pysyncobj's Fernet key uses the same
_SENDER_INFO = b"kmsd raft wire v1 sender key"
_HEADER = struct.Struct(">c16sQ")
# pysyncobj pickles with protocol 2, which has no opcode for bytes: it turns each
# bytes object (a log entry, key material) into a latin-1 str and back, ~125 µs and
# 1.5x the size for 12 KB of binary data, against ~1 µs with protocol 5. Any pickle
# protocol loads with pickle.loads, so this only matters on the sending side.
_PICKLE_PROTOCOL = 5
# Sender ids remembered by a receiver (each is a peer process or utility client that
# authenticated): beyond this, the oldest are forgotten, and a replay onto a new
# connection is still refused by pysyncobj's per-connection random keys.
_MAX_SENDERS = 1024


def master_key(password: str | bytes) -> bytes:
    secret = password.encode() if isinstance(password, str) else password
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=_SALT,
                     iterations=_ITERATIONS)
    return kdf.derive(secret)


def _sender_key(master: bytes, sender_id: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=sender_id,
               info=_SENDER_INFO).derive(master)
    return AESGCM(key)


class AeadEncryptor:
    """The three calls pysyncobj's TcpConnection makes on its `encryptor`."""

    def __init__(self, password: str | bytes) -> None:
        self._master = master_key(password)
        self._new_sender()
        # Receiving side: sender id -> (its key, the last counter accepted from it).
        self._senders: dict[bytes, tuple[AESGCM, int]] = {}

    def _new_sender(self) -> None:
        self._pid = os.getpid()
        self._sender_id = os.urandom(16)
        self._key = _sender_key(self._master, self._sender_id)
        # next() on itertools.count is atomic under the GIL.
        self._counter = itertools.count(1)

    def encrypt_at_time(self, data: bytes, _current_time: int) -> bytes:
        if os.getpid() != self._pid:
            # A forked child must never reuse its parent's (key, nonce) pairs.
            self._new_sender()
        counter = next(self._counter)
        header = _HEADER.pack(VERSION, self._sender_id, counter)
        return header + self._key.encrypt(_nonce(counter), data, header)

    def extract_timestamp(self, token: bytes) -> int:
        # Read before decrypt() authenticates it: if it is forged, decrypt() fails and
        # pysyncobj drops the connection, and with it the value it recorded from here.
        return _HEADER.unpack_from(token)[2]

    def decrypt(self, token: bytes) -> bytes:
        if len(token) < _HEADER.size + 16:
            raise InvalidTag()
        version, sender_id, counter = _HEADER.unpack_from(token)
        if version != VERSION:
            raise InvalidTag()
        known = self._senders.get(sender_id)
        key = known[0] if known is not None else _sender_key(self._master, sender_id)
        if known is not None and counter <= known[1]:
            raise InvalidTag()  # a replay
        data = key.decrypt(_nonce(counter), memoryview(token)[_HEADER.size:],
                           token[:_HEADER.size])
        if known is None and len(self._senders) >= _MAX_SENDERS:
            del self._senders[next(iter(self._senders))]
        self._senders[sender_id] = (key, counter)
        return data


def _nonce(counter: int) -> bytes:
    return b"\0\0\0\0" + counter.to_bytes(8, "big")


def _same(data: bytes, _level: int = -1) -> bytes:
    return data


def _dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=_PICKLE_PROTOCOL)


def install() -> None:
    """Make pysyncobj's TCP connections in this process send messages uncompressed and
    pickled with protocol 5. Every process that talks to the Raft port must call it
    (RaftNode.start does)."""
    import pysyncobj.pickle
    import pysyncobj.tcp_connection

    # These replace the zlib and pickle modules inside pysyncobj.tcp_connection only.
    pysyncobj.tcp_connection.zlib = types.SimpleNamespace(compress=_same, decompress=_same)
    pysyncobj.tcp_connection.pickle = types.SimpleNamespace(dumps=_dumps,
                                                            loads=pysyncobj.pickle.loads)


def utility(password: str, timeout: float = 10.0) -> Any:
    """pysyncobj's admin client (status, add, remove, ...) speaking this wire."""
    from pysyncobj.utility import TcpUtility

    install()
    client = TcpUtility(password=None, timeout=timeout)
    client._TcpUtility__connection.encryptor = AeadEncryptor(password)
    return client
