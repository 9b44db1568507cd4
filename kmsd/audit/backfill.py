"""Fetching the audit records a node missed (joined late, or wiped) from its peers.

Peers authenticate to each other's `/v1/internal/...` admin routes with an
HMAC of the request under a key derived from the cluster's Raft secret, which
only members hold. Fetched records are trusted only after they verify: each
record's hash is recomputed, each links to the one before, the first links to
this node's files and the last to the batch the node is holding.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
import time
import urllib.request
from typing import Any

import structlog

from kmsd.audit.chain import GENESIS_HASH, ChainedRecord, canonical_bytes
from kmsd.audit.sink import Gap, SegmentSink

log = structlog.get_logger("kmsd.audit")

PEER_HEADER = "X-Kmsd-Peer"
MAX_SKEW_SECONDS = 300


def peer_key(raft_secret: str) -> bytes:
    return hashlib.sha256(b"kmsd peer authentication v1\x00" + raft_secret.encode()).digest()


def sign_peer_request(key: bytes, node_id: str, method: str, path_qs: str,
                      now: float | None = None) -> str:
    stamp = str(int(now if now is not None else time.time()))
    mac = hmac.new(key, f"{node_id}\n{stamp}\n{method}\n{path_qs}".encode(),
                   hashlib.sha256).hexdigest()
    return f"{node_id}:{stamp}:{mac}"


def verify_peer_request(key: bytes, header: str, method: str, path_qs: str,
                        now: float | None = None) -> bool:
    try:
        node_id, stamp, mac = header.split(":", 2)
        skew = abs((now if now is not None else time.time()) - int(stamp))
    except ValueError:
        return False
    expected = hmac.new(key, f"{node_id}\n{stamp}\n{method}\n{path_qs}".encode(),
                        hashlib.sha256).hexdigest()
    return skew <= MAX_SKEW_SECONDS and hmac.compare_digest(expected, mac)


def records_linking(gap: Gap, fetched: list[dict[str, Any]]) -> list[ChainedRecord] | None:
    """The fetched records if they exactly fill the gap, else None."""
    records = []
    prev = gap.after.hash if gap.after else GENESIS_HASH
    seq = gap.after.seq if gap.after else 0
    for raw in fetched:
        record = ChainedRecord(raw["seq"], raw["prev_hash"], raw["hash"], raw["node"],
                               raw["revoked"], canonical_bytes(raw["event"]))
        if (record.seq != seq + 1 or record.prev_hash != prev
                or record.computed_hash() != record.hash):
            return None
        records.append(record)
        prev, seq = record.hash, record.seq
    if seq != gap.before.seq - 1 or prev != gap.before.prev_hash:
        return None
    return records


class Backfiller:
    def __init__(self, sink: SegmentSink, node_id: str, raft_secret: str,
                 peers: Any, ssl_context: ssl.SSLContext | None = None,
                 interval: float = 1.0) -> None:
        self.sink = sink
        self.node_id = node_id
        self.key = peer_key(raft_secret)
        self.peers = peers  # () -> list of admin URLs of the other members
        self.ssl_context = ssl_context
        self.interval = interval

    def _fetch(self, url: str, after: int, before: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while after + len(out) < before - 1:
            path = f"/v1/internal/audit/records?after={after + len(out)}&limit=1000"
            request = urllib.request.Request(url.rstrip("/") + path, headers={
                PEER_HEADER: sign_peer_request(self.key, self.node_id, "GET", path)})
            with urllib.request.urlopen(request, timeout=10,
                                        context=self.ssl_context) as response:
                page = json.loads(response.read())["Records"]
            if not page:
                break
            out.extend(r for r in page if r["seq"] < before)
        return out

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            gap = self.sink.pending_gap
            if gap is None:
                continue
            after = gap.after.seq if gap.after else 0
            for url in self.peers():
                try:
                    fetched = await loop.run_in_executor(None, self._fetch, url, after,
                                                         gap.before.seq)
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("audit_backfill_peer_failed", peer=url,
                                error=type(exc).__name__)
                    continue
                records = records_linking(gap, fetched)
                if records is not None:
                    self.sink.backfill(records)
                    log.info("audit_backfilled", records=len(records), peer=url)
                    break
