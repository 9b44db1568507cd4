"""This node's sessions with the PKCS#11 tokens behind custom key stores.

A kmsd CloudHSM-type key store is a token whose label is the store's CloudHsmClusterId,
reachable by every node through the node's PKCS#11 module, and holding the store key
(an AES-256 key under the same label as a node's domain key, the same key on every
node's token, as the HSMs of one CloudHSM cluster share their keys). Keys created in the
store are generated in that token and kept in the Raft log wrapped under the store key,
so they are usable only where the store token is.

What it owns: opening a store's token with its PIN (the KeyStorePassword, unsealed from
the replicated state with this node's domain key), checking that the token holds the
store key the store recorded, keeping that session until the store is disconnected or
changed (`close`), and naming why a token cannot be used as AWS's ConnectionErrorCode.

Never logs the PIN, and never puts it into an exception.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from cluster.state import CustomKeyStoreRecord
from kmsd.hsm.partition import HsmAuthenticationFailed, HsmError, HsmPartition

CLUSTER_NOT_FOUND = "CLUSTER_NOT_FOUND"
INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
USER_LOCKED_OUT = "USER_LOCKED_OUT"
INTERNAL_ERROR = "INTERNAL_ERROR"


def password_aad(store_id: str) -> bytes:
    """What a store's sealed PIN is bound to: it cannot be moved to another store."""
    return b"kmsd custom key store password\x00" + store_id.encode()


class StoreUnreachable(Exception):
    """This node cannot use the store's token now; `code` is AWS's ConnectionErrorCode."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Probe:
    """What connecting found: the store key's check value."""

    key_check: str


class KeyStoreTokens:
    def __init__(self, module_path: str, domain: HsmPartition) -> None:
        self.module_path = module_path
        self._domain = domain
        # store id -> (token label, open partition)
        self._open: dict[str, tuple[str, HsmPartition]] = {}

    def _login(self, cluster_id: str, pin: str) -> HsmPartition:
        try:
            return HsmPartition(self.module_path, cluster_id, pin)
        except HsmError as error:
            # The message ends with the PKCS#11 error's name, never with the PIN.
            text = str(error)
            if "NoSuchToken" in text or "MultipleTokensReturned" in text:
                raise StoreUnreachable(CLUSTER_NOT_FOUND,
                                       f"no PKCS#11 token labelled {cluster_id!r} on this node"
                                       ) from None
            if "PinIncorrect" in text or "PinLenRange" in text:
                raise StoreUnreachable(INVALID_CREDENTIALS,
                                       f"the token {cluster_id!r} refused the key store "
                                       "password") from None
            if "PinLocked" in text:
                raise StoreUnreachable(USER_LOCKED_OUT,
                                       f"the token {cluster_id!r} has locked its user") from None
            raise StoreUnreachable(INTERNAL_ERROR, text) from None

    def _pin(self, store: CustomKeyStoreRecord) -> str:
        try:
            return self._domain.unseal(store.sealed_password,
                                       password_aad(store.store_id)).decode()
        except (HsmAuthenticationFailed, UnicodeDecodeError):
            raise StoreUnreachable(INTERNAL_ERROR, "the key store password does not unseal "
                                                   "under this node's domain key") from None

    def connect(self, store: CustomKeyStoreRecord) -> Probe:
        """Open the store's token afresh with its password and find the store key."""
        self.close(store.store_id)
        partition = self._login(store.cluster_id, self._pin(store))
        try:
            if not partition.has_domain_key():
                raise StoreUnreachable(CLUSTER_NOT_FOUND,
                                       f"the token {store.cluster_id!r} holds no kmsd store key")
            check = partition.domain_key_check_value()
        except BaseException:
            with contextlib.suppress(Exception):
                partition.close()
            raise
        self._open[store.store_id] = (store.cluster_id, partition)
        return Probe(check)

    def partition(self, store: CustomKeyStoreRecord) -> HsmPartition:
        """The open session with a connected store's token (opened on first use)."""
        opened = self._open.get(store.store_id)
        if opened is not None and opened[0] == store.cluster_id:
            return opened[1]
        probe = self.connect(store)
        if store.key_check is not None and probe.key_check != store.key_check:
            self.close(store.store_id)
            raise StoreUnreachable(CLUSTER_NOT_FOUND,
                                   f"the token {store.cluster_id!r} on this node holds another "
                                   "store key")
        return self._open[store.store_id][1]

    def evict(self, wrapped: bytes) -> None:
        """Drop a deleted key's cached handle from whichever store token holds it."""
        for _, partition in list(self._open.values()):
            partition.evict(wrapped)

    def close(self, store_id: str) -> None:
        opened = self._open.pop(store_id, None)
        if opened is not None:
            with contextlib.suppress(Exception):  # a token gone away cannot close cleanly
                opened[1].close()

    def close_all(self) -> None:
        for store_id in list(self._open):
            self.close(store_id)
