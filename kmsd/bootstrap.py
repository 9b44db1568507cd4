"""`kmsd init`: the first credentials of an account, made before the cluster runs.

`kmsd init --config node.toml` creates the domain key in the node's token if it
has none, draws a root access key from the HSM, seals its secret under the
domain key and leaves only the sealed form in the node's data dir
(`bootstrap-access-key.sealed`). It prints the access key once. When the node
next serves, it proposes the account root principal and that access key
through Raft and removes the file. The secret is never on disk in plaintext.
"""

from __future__ import annotations

import base64
import contextlib
import os
from dataclasses import dataclass

import msgpack

from kmsd.auth.credentials import secret_aad
from kmsd.hsm.partition import HsmPartition

BOOTSTRAP_FILE = "bootstrap-access-key.sealed"
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


@dataclass(frozen=True)
class SealedAccessKey:
    access_key_id: str
    sealed_secret: bytes


def new_access_key_id(random: bytes) -> str:
    return "AKIA" + "".join(_BASE32[b % 32] for b in random[:16])


def new_secret(random: bytes) -> str:
    return base64.b64encode(random[:30]).decode()


def init(partition: HsmPartition, data_dir: str, access_key_id: str | None = None,
         secret: str | None = None) -> tuple[str, str]:
    """Seal a root access key for the node to propose; returns (id, secret) to print once."""
    if not partition.has_domain_key():
        partition.create_domain_key()
    access_key_id = access_key_id or new_access_key_id(partition.random(16))
    secret = secret or new_secret(partition.random(30))
    sealed = partition.seal(secret.encode(), secret_aad(access_key_id))
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, BOOTSTRAP_FILE)
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(msgpack.packb({"access_key_id": access_key_id, "sealed_secret": sealed}))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(path + ".tmp", path)
    return access_key_id, secret


def pending(data_dir: str) -> SealedAccessKey | None:
    path = os.path.join(data_dir, BOOTSTRAP_FILE)
    try:
        with open(path, "rb") as handle:
            raw = msgpack.unpackb(handle.read())
    except (OSError, ValueError):
        return None
    return SealedAccessKey(raw["access_key_id"], raw["sealed_secret"])


def done(data_dir: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(data_dir, BOOTSTRAP_FILE))
