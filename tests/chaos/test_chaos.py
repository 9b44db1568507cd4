"""Chaos in the test suite: a short run of scripts/chaos, and what such runs found,
reproduced deterministically where that can be done.

The run's length is KMSD_CHAOS_SECONDS (default 45 s of faults, extended until every
kind of fault has run once); KMSD_CHAOS_KEEP=1 keeps its data dir (the path is in the
printed report). Longer runs are `scripts/chaos --duration 600`.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.chaos_run import Options, run, summary
from tests.chaos.checks import audit_records, wait_same_heads
from tests.integration.harness import Cluster, start_cluster, wait_for

CHAOS_SECONDS = float(os.environ.get("KMSD_CHAOS_SECONDS", "45"))
# The run is a module fixture: whichever test comes first pays for it, on a busy machine.
pytestmark = pytest.mark.timeout(900)
DAY = 86400


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    # Short faults and pauses, so that every kind of fault fits in the short run.
    result = run(Options(duration=CHAOS_SECONDS, workers=4, warmup=3.0, cooldown=3.0,
                         hold=(2.0, 4.0), calm=(1.0, 2.0),
                         keep=os.environ.get("KMSD_CHAOS_KEEP") == "1"))
    print(summary(result))
    return result


def _violations(report: dict[str, Any], check: str) -> list[str]:
    return report["checks"].get(check, {}).get("violations") or \
        report["checks"].get(check, {}).get("hits") or []


def test_chaos_run_keeps_every_invariant(report: dict[str, Any]) -> None:
    checks = report["checks"]
    assert set(checks) >= {"audit", "writes", "key_state", "ciphertexts", "secret_scan",
                           "node_logs"}
    for name in ("writes", "key_state", "ciphertexts", "secret_scan", "node_logs", "workload",
                 "cleanup", "recovery"):
        assert name not in checks or checks[name]["ok"], (name, _violations(report, name))
    audit = checks["audit"]
    assert audit["counts"]["checked_exactly_one"] > 0
    # Every node holds the same verified chain, with exactly one record per answered request.
    assert audit["counts"]["diverged_nodes"] == []
    assert audit["ok"], _violations(report, "audit")


def test_chaos_run_injected_every_kind_of_fault(report: dict[str, Any]) -> None:
    kinds = {f["kind"] for f in report["faults"]}
    expected = {"kill-random", "kill-leader", "freeze-random", "freeze-leader",
                "partition-random", "partition-leader"}
    if report["network"]["mode"] == "netns":
        expected.add("partition-link")
    assert kinds == expected, report["network"]
    if report["network"]["mode"] == "netns":
        assert report["network"]["left_behind"] == []
    assert all(f["recovery_s"] is not None for f in report["faults"]), report["faults"]


def test_chaos_run_measures_availability(report: dict[str, Any]) -> None:
    availability = report["availability"]
    assert availability["none"]["calls"] > 100
    # Without a fault, nearly every call succeeds; faults cost availability, not safety.
    assert availability["none"]["success_share"] > 0.9, availability["none"]
    gap = report["longest_write_gap"]
    assert gap["successful_writes"] > 0 and gap["seconds"] < 60, gap


@pytest.fixture()
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(str(tmp_path_factory.mktemp("snapshot-gap")),
                            extra_args=("--test-clock", "--scheduler-interval", "0.3"))
    yield running
    for pid in running.info["pids"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    running.stop()


def test_a_node_that_catches_up_by_snapshot_keeps_its_audit_chain(timed: Cluster) -> None:
    """Found by the chaos run: a node restored from a Raft snapshot had a permanent gap in
    its segment files (kmsd/audit/backfill.py now fetches it from a peer; this guards it)."""
    cluster = timed
    key = cluster.client(0).create_key()["KeyMetadata"]["KeyId"]
    cluster.client(0).schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
    away = next(n for n in range(cluster.size) if n != leader)
    # Killed rather than frozen: a frozen node's socket buffers keep taking the leader's
    # entries, so it would not need a snapshot; a partition or a restart does.
    cluster.kill(away)
    for _ in range(5):
        cluster.client(leader).generate_random(NumberOfBytes=8)
    # The deletion compacts every running node's Raft log (kmsd/node.py, _on_applied),
    # so the node that was away can only catch up by snapshot.
    for path in cluster.info["clock_offset_files"]:
        with open(path, "w") as handle:
            handle.write(str(8 * DAY))
    wait_for(lambda: _gone(cluster, leader, key), 30, what="the key's deletion")
    for _ in range(5):
        cluster.client(leader).generate_random(NumberOfBytes=8)
    time.sleep(1.0)
    cluster.restart(away)
    tip = wait_same_heads(cluster)
    # The node may fetch what it missed from a peer (kmsd/audit/backfill.py): give it time.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: cluster.admin(away, "GET", "/v1/audit/verify")["ok"], 45,
                 interval=1.0, what="the node's audit chain to verify")
    verified = cluster.admin(away, "GET", "/v1/audit/verify")
    assert verified["ok"], verified
    chains = [[r["hash"] for r in audit_records(cluster, n)] for n in range(cluster.size)]
    assert len(chains[away]) == tip["seq"]
    assert chains[0] == chains[1] == chains[2]


def _gone(cluster: Cluster, node: int, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        cluster.client(node).describe_key(KeyId=key)
    except ClientError as error:
        return error.response["Error"]["Code"] == "NotFoundException"
    return False


def _views_by_definition(path: str) -> list[bytes]:
    """stored_views spelt out one character at a time, as the scan's contract reads."""
    with open(path, "rb") as handle:
        raw = handle.read()
    views = [raw]
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
        views.append(raw)
    text = raw.decode("utf-8", "replace")
    views.append(bytes(ord(ch) if ord(ch) < 256 else 0 for ch in text))
    return views


def test_the_scan_sees_what_the_harness_sees(tmp_path) -> None:
    """The fast stored_views the scan uses gives the views their definition gives."""
    import pickle

    from tests.chaos import secret_scan

    secret = os.urandom(40)
    samples = {"pickle": pickle.dumps({"blob": secret, "text": "h\u00e9llo \u2603"}, protocol=2),
               "gzip": gzip.compress(b"x" * 100 + secret), "binary": os.urandom(5000) + secret,
               "text": "plain \u20ac text".encode()}
    for name, data in samples.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert secret_scan.stored_views(str(path)) == _views_by_definition(str(path)), name
    hits = secret_scan.scan([str(tmp_path)], [secret]).hits
    assert {hit.split(":")[0].rsplit("/", 1)[1] for hit in hits} >= {"pickle", "gzip", "binary"}
