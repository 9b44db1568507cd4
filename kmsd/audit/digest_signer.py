"""The node side of signed digests: the signing key's creation and the periodic signing.

The leader signs the chain head every `interval` seconds when the chain has
grown since its last digest; any node signs on demand (admin API). The
signature is made in the HSM (P-256, ~0.2 ms on SoftHSM2: inline is fine).
"""

from __future__ import annotations

import asyncio
import datetime
import uuid

import structlog

from cluster import commands
from kmsd.audit import digests
from kmsd.audit.chain import AuditEntry, ChainedRecord
from kmsd.audit.committer import AuditCommitter, AuditUnavailable
from kmsd.errors import KmsError
from kmsd.hsm.asymmetric import AsymmetricKeys
from kmsd.service.core import ServiceCore

log = structlog.get_logger("kmsd.audit")


class DigestSigner:
    def __init__(self, core: ServiceCore, committer: AuditCommitter, keys: AsymmetricKeys,
                 node_id: str, interval_seconds: float) -> None:
        self.core = core
        self.committer = committer
        self.keys = keys
        self.node_id = node_id
        self.interval = interval_seconds
        self._last_signed_seq = 0

    async def ensure_key(self) -> None:
        if self.core.state.audit_signing_key is None:
            generated = self.keys.generate(digests.KEY_SPEC)
            assert generated.public_key_der is not None
            await self.core.commit(commands.SetAuditSigningKey(generated.wrapped_private,
                                                               generated.public_key_der))

    async def sign_now(self) -> ChainedRecord:
        await self.ensure_key()
        signing = self.core.state.audit_signing_key
        assert signing is not None
        wrapped, public_key = signing
        head = self.core.state.audit.head
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        signature = self.keys.sign(wrapped, digests.KEY_SPEC, digests.ALGORITHM,
                                   digests.digest_message(head.seq, head.hash, when), "RAW")
        event = digests.digest_event(head.seq, head.hash, when, signature, public_key,
                                     self.core.regions[0], self.core.account_id,
                                     str(uuid.uuid4()), str(uuid.uuid4()))
        entry = AuditEntry.of(event, self.node_id)
        record = await self.committer.commit((entry.event_bytes, self.node_id, (), ()))
        self._last_signed_seq = record.seq
        return record

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.core.raft.is_leader:
                continue
            if self.core.state.audit.head.seq <= self._last_signed_seq:
                continue
            try:
                record = await self.sign_now()
                log.info("audit_digest_signed", seq=record.seq)
            except (KmsError, AuditUnavailable) as error:
                log.warning("audit_digest_failed", error=type(error).__name__)
