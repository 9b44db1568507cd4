"""Peer authentication and the linking check of fetched audit records."""

from __future__ import annotations

from kmsd.audit.backfill import (
    peer_key,
    records_linking,
    sign_peer_request,
    verify_peer_request,
)
from kmsd.audit.chain import AuditChain, AuditEntry, ChainHead
from kmsd.audit.sink import Gap


def _chain(count: int) -> list:
    chain = AuditChain()
    return chain.append([AuditEntry.of({"eventName": f"E{i}"}, "node-1") for i in range(count)])


def _raw(record) -> dict:
    return {"seq": record.seq, "prev_hash": record.prev_hash, "hash": record.hash,
            "node": record.node, "revoked": record.revoked, "event": record.event}


def test_peer_signature_round_trip_and_refusals() -> None:
    key = peer_key("cluster secret")
    header = sign_peer_request(key, "node-2", "GET", "/v1/internal/x?a=1", now=1000)
    assert verify_peer_request(key, header, "GET", "/v1/internal/x?a=1", now=1100)
    assert not verify_peer_request(key, header, "GET", "/v1/internal/x?a=2", now=1100)
    assert not verify_peer_request(key, header, "POST", "/v1/internal/x?a=1", now=1100)
    assert not verify_peer_request(key, header, "GET", "/v1/internal/x?a=1", now=1000 + 301)
    assert not verify_peer_request(peer_key("other"), header, "GET", "/v1/internal/x?a=1",
                                   now=1000)
    assert not verify_peer_request(key, "garbage", "GET", "/", now=1000)


def test_records_must_fill_the_gap_exactly() -> None:
    records = _chain(10)
    gap = Gap(ChainHead(records[2].seq, records[2].hash), records[7])
    fill = [_raw(r) for r in records[3:7]]
    assert [r.seq for r in records_linking(gap, fill)] == [4, 5, 6, 7]
    assert records_linking(gap, fill[:-1]) is None          # short
    assert records_linking(gap, fill[1:]) is None           # does not start at the files' head
    tampered = [dict(r) for r in fill]
    tampered[1]["event"] = {"eventName": "forged"}
    assert records_linking(gap, tampered) is None           # hash no longer matches
    from_start = Gap(None, records[3])
    assert [r.seq for r in records_linking(from_start, [_raw(r) for r in records[:3]])] == \
        [1, 2, 3]
