"""What every operation module needs: the local replica, Raft, the HSM and a clock.

Writes go through `commit`, which answers only after the command is committed
by a Raft majority and applied on this node. Reads come from the local
replica; a key that is not there yet (created through another node a moment
ago) triggers one catch-up barrier before the answer is "not found".
"""

from __future__ import annotations

from typing import Any

from cluster import commands
from cluster.raft_node import RaftNode, RaftUnavailable
from cluster.state import (
    KEY_STATE_DISABLED,
    KEY_STATE_PENDING_DELETION,
    KEY_STATE_PENDING_IMPORT,
    STORE_CONNECTED,
    KeyRecord,
    KmsState,
    Rejected,
)
from kmsd.auth.authorizer import Authorizer
from kmsd.clock import Clock
from kmsd.errors import (
    DisabledException,
    KeyUnavailableException,
    KMSInternalException,
    KMSInvalidStateException,
    NotFoundException,
    error_class,
)
from kmsd.hsm.partition import HsmPartition
from kmsd.service.context import RequestContext
from kmsd.service.key_lookup import resolve_key
from kmsd.service.key_store_tokens import KeyStoreTokens, StoreUnreachable

UNAVAILABLE_MESSAGE = "The cluster could not commit the request in time; retry it."


class ServiceCore:
    def __init__(self, state: KmsState, raft: RaftNode, hsm: HsmPartition, clock: Clock,
                 account_id: str, regions: tuple[str, ...]) -> None:
        self.state = state
        self.raft = raft
        self.hsm = hsm
        self.clock = clock
        self.account_id = account_id
        self.regions = regions
        self.authorizer = Authorizer(state)
        # Config `[hsm] allow_host_oaep_decoding`: see kmsd/service/key_import.py.
        self.allow_host_oaep_decoding = False
        self.key_stores = KeyStoreTokens(hsm.module_path, hsm)

    async def authorize(self, ctx: RequestContext, operation: str, record: KeyRecord | None,
                        params: dict[str, Any]) -> None:
        """Key policy + identity policies + grants; AccessDeniedException if none allows."""
        if self.authorizer.tokens_missing_locally(params.get("GrantTokens")):
            # A grant token makes a new grant usable at once: wait for its log position.
            await self.catch_up()
        self.authorizer.check(ctx, operation, record, params)

    async def commit(self, command: commands.Command) -> Any:
        try:
            result = await self.raft.submit(command)
        except RaftUnavailable:
            raise KMSInternalException(UNAVAILABLE_MESSAGE) from None
        if isinstance(result, Rejected):
            raise error_class(result.error_type)(result.message)
        return result.value

    async def catch_up(self) -> None:
        try:
            await self.raft.barrier()
        except RaftUnavailable:
            raise KMSInternalException(UNAVAILABLE_MESSAGE) from None

    async def find_key(self, ctx: RequestContext, identifier: str,
                       allow_alias: bool = True) -> KeyRecord:
        try:
            return resolve_key(self.state, ctx.region, self.account_id, identifier, allow_alias)
        except NotFoundException:
            await self.catch_up()
            return resolve_key(self.state, ctx.region, self.account_id, identifier, allow_alias)

    async def authorized_key(self, ctx: RequestContext, operation: str, params: dict[str, Any],
                             identifier: str | None = None,
                             allow_alias: bool = True) -> KeyRecord:
        """The key a request names, once the caller is allowed `operation` on it."""
        record = await self.find_key(ctx, params["KeyId"] if identifier is None else identifier,
                                     allow_alias)
        await self.authorize(ctx, operation, record, params)
        return record

    async def find_key_by_id(self, ctx: RequestContext, key_id: str) -> KeyRecord | None:
        record = self.state.keys.get(key_id)
        if record is None:
            await self.catch_up()
            record = self.state.keys.get(key_id)
        if record is None or record.region != ctx.region:
            return None
        return record

    def require_usable(self, record: KeyRecord) -> None:
        """The key-state check of every cryptographic operation."""
        if record.key_state == KEY_STATE_DISABLED:
            raise DisabledException(f"{record.arn} is disabled.")
        if record.key_state == KEY_STATE_PENDING_DELETION:
            raise KMSInvalidStateException(f"{record.arn} is pending deletion.")
        if record.key_state == KEY_STATE_PENDING_IMPORT:
            raise KMSInvalidStateException(f"{record.arn} is pending import.")
        if not self.store_connected(record):
            # AWS key state table, note [11]: "KMSInvalidStateException: <CMK ARN> is
            # unavailable." -- a key whose custom key store is disconnected.
            raise KMSInvalidStateException(f"{record.arn} is unavailable.")

    def store_connected(self, record: KeyRecord) -> bool:
        """False for a key whose custom key store is not connected (key state Unavailable)."""
        if record.custom_key_store_id is None:
            return True
        store = self.state.custom_key_stores.get(record.custom_key_store_id)
        return store is not None and store.connection_state == STORE_CONNECTED

    def partition_for(self, record: KeyRecord) -> HsmPartition:
        """The token that holds this key's material: the node's own, or its key store's."""
        if record.custom_key_store_id is None:
            return self.hsm
        store = self.state.custom_key_stores.get(record.custom_key_store_id)
        if store is None or store.connection_state != STORE_CONNECTED:
            raise KMSInvalidStateException(f"{record.arn} is unavailable.")
        try:
            return self.key_stores.partition(store)
        except StoreUnreachable:
            # Connected, but this node cannot reach the store's token now: retryable.
            raise KeyUnavailableException(
                f"{record.arn} is unavailable: this node cannot reach its custom key store "
                f"{store.store_id}; retry the request.") from None

    def random(self, length: int) -> bytes:
        return self.hsm.random(length)
