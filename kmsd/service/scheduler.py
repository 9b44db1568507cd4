"""Time-driven key changes, proposed by the leader: deletion at the end of the
pending window, automatic rotation and the expiry of imported key material.

The state machine never reads a clock: the leader compares the dates stored in
the replicated state with its proposer clock and proposes DeleteKey or
RotateKey commands carrying that time. Every node runs this loop and only the
current leader acts, so the work continues after a leader change; commands are
idempotent against a second proposal (DeleteKey re-checks the date, RotateKey
names the version it replaces).
"""

from __future__ import annotations

import asyncio

import structlog

from cluster import commands
from cluster.state import KEY_STATE_ENABLED, KEY_STATE_PENDING_DELETION, ROTATION_AUTOMATIC
from kmsd.errors import KmsError
from kmsd.service.core import ServiceCore
from kmsd.service.key_import import expire_due
from kmsd.service.rotation import rotate

log = structlog.get_logger("kmsd.scheduler")


class KeyScheduler:
    def __init__(self, core: ServiceCore, interval_seconds: float) -> None:
        self.core = core
        self.interval = interval_seconds

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.core.raft.is_leader:
                continue
            try:
                await self.run_once()
            except KmsError as error:
                log.warning("scheduler_round_failed", error=error.error_type)

    async def run_once(self) -> None:
        now = self.core.clock.now()
        for record in list(self.core.state.keys.values()):
            due_deletion = (record.key_state == KEY_STATE_PENDING_DELETION
                            and record.deletion_date is not None and record.deletion_date <= now)
            due_rotation = (record.key_state == KEY_STATE_ENABLED and record.rotation_enabled
                            and record.next_rotation_at is not None
                            and record.next_rotation_at <= now)
            if due_deletion and await self.core.commit(commands.DeleteKey(record.key_id, now)):
                log.info("key_deleted", key_id=record.key_id)
            elif due_rotation and await rotate(self.core, record, ROTATION_AUTOMATIC):
                log.info("key_rotated", key_id=record.key_id, rotation="automatic")
            elif not due_deletion and await expire_due(self.core, record, now):
                log.info("imported_key_material_expired", key_id=record.key_id)
