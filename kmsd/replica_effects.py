"""What applying a command means outside the replicated state, in every process that holds a
copy of it: HSM handles of deleted material are dropped, sessions with a custom key store
that was disconnected, changed or deleted are closed.

The node's primary process applies in a Raft tick, an API worker as it reads its feed; both
run on the process's event loop, and the work itself is left to a later turn of it.
"""

from __future__ import annotations

import asyncio

import structlog

from cluster import commands
from cluster.state import STORE_CONNECTED, Applied, ApplyResult, KeyRecord, MaterialDeleted
from kmsd.hsm.partition import HsmError, HsmPartition
from kmsd.service.asymmetric_hsm import AsymmetricHsm
from kmsd.service.core import ServiceCore

log = structlog.get_logger("kmsd.node")


class ReplicaEffects:
    def __init__(self, core: ServiceCore, hsm: HsmPartition, asymmetric: AsymmetricHsm) -> None:
        self.core = core
        self.hsm = hsm
        self.asymmetric = asymmetric
        self.loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Future[None]] = set()

    def applied(self, command: commands.Command, result: ApplyResult) -> bool:
        """Schedule the effects of one applied command; True if it had any."""
        loop = self.loop
        if loop is None or not isinstance(result, Applied):
            return False
        if isinstance(command, commands.DeleteKey) and isinstance(result.value, KeyRecord):
            removed = [b.wrapped for b in result.value.backing_keys]
            loop.call_soon_threadsafe(self._forget_key, removed)
            return True
        if isinstance(command, (commands.SetCustomKeyStoreConnection,
                                commands.UpdateCustomKeyStore, commands.DeleteCustomKeyStore)):
            store = result.value
            if (not isinstance(command, commands.SetCustomKeyStoreConnection)
                    or store.connection_state != STORE_CONNECTED):
                # Disconnected, changed or deleted: every process ends its session with the
                # store's token at this log position (reopened with the new settings on use).
                loop.call_soon_threadsafe(self.core.key_stores.close, store.store_id)
            return True
        if (isinstance(command, commands.DeleteImportedKeyMaterial)
                and isinstance(result.value, MaterialDeleted)):
            # Every node, not only the one that served the request (or ran the expiry),
            # forgets the deleted material at this log position.
            loop.call_soon_threadsafe(self._forget_material, result.value.removed)
            return True
        return False

    def _forget_key(self, removed: list[bytes]) -> None:
        """On the event loop: drop the handles of a deleted key's material (the node's token
        or its custom key store's)."""
        for wrapped in removed:
            self.hsm.evict(wrapped)
            self.core.key_stores.evict(wrapped)

    def _forget_material(self, removed: tuple[bytes, ...]) -> None:
        for wrapped in removed:
            self.hsm.evict(wrapped)
        task = asyncio.ensure_future(self._forget_asymmetric(removed))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _forget_asymmetric(self, removed: tuple[bytes, ...]) -> None:
        try:
            await self.asymmetric.router.evict(removed)
        except HsmError as error:
            # The helper process is gone or restarting: its handles went with it.
            log.warning("forget_material_failed", error=type(error).__name__)
