"""kill -9 of a follower and of the leader: writes continue, nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import threading
import time

from botocore.exceptions import ClientError

from tests.integration.harness import Cluster, wait_for


def _create_keys(cluster: Cluster, node: int, count: int) -> list[str]:
    return [cluster.client(node, retries=5).create_key(Description=f"k{i}")["KeyMetadata"]["KeyId"]
            for i in range(count)]


def _all_present(cluster: Cluster, node: int, key_ids: list[str]) -> bool:
    client = cluster.client(node)
    return all(client.describe_key(KeyId=k)["KeyMetadata"]["KeyId"] == k for k in key_ids)


def test_follower_killed_and_restarted_catches_up(own_cluster: Cluster) -> None:
    cluster = own_cluster
    leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
    follower = next(n for n in range(cluster.size) if n != leader)
    survivor = next(n for n in range(cluster.size) if n not in (leader, follower))
    before = _create_keys(cluster, follower, 3)
    blob = cluster.client(follower).encrypt(KeyId=before[0], Plaintext=b"p1")["CiphertextBlob"]

    cluster.kill(follower)
    during = _create_keys(cluster, leader, 3) + _create_keys(cluster, survivor, 3)
    assert cluster.client(survivor).decrypt(CiphertextBlob=blob)["Plaintext"] == b"p1"

    cluster.restart(follower)
    wait_for(lambda: _all_present(cluster, follower, before + during), 30,
             what="the restarted follower to catch up")
    assert cluster.client(follower).decrypt(CiphertextBlob=blob)["Plaintext"] == b"p1"
    after = _create_keys(cluster, follower, 2)
    for node in range(cluster.size):
        wait_for(lambda n=node: _all_present(cluster, n, before + during + after), 30,
                 what=f"every key on node {node}")


def test_leader_killed_new_leader_elected_and_writes_resume(own_cluster: Cluster) -> None:
    cluster = own_cluster
    old_leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
    others = [n for n in range(cluster.size) if n != old_leader]
    acknowledged = _create_keys(cluster, others[0], 3) + _create_keys(cluster, old_leader, 2)

    cluster.kill(old_leader)
    new_leader = wait_for(lambda: cluster.leader(among=others), 30, what="a new leader")
    assert new_leader in others
    acknowledged += _create_keys(cluster, others[0], 3) + _create_keys(cluster, others[1], 3)
    for node in others:
        wait_for(lambda n=node: _all_present(cluster, n, acknowledged), 30,
                 what=f"keys on node {node}")

    cluster.restart(old_leader)
    wait_for(lambda: _all_present(cluster, old_leader, acknowledged), 30,
             what="the old leader to catch up")
    status = cluster.node_status(old_leader)
    assert status is not None and status["raft"]["role"] in ("follower", "leader")


def test_every_node_killed_at_once_restarts_with_every_acknowledged_write(
        own_cluster: Cluster) -> None:
    cluster = own_cluster
    acknowledged = [_create_keys(cluster, node, 3) for node in range(cluster.size)]
    key_ids = [k for keys in acknowledged for k in keys]
    blob = cluster.client(0).encrypt(KeyId=key_ids[0], Plaintext=b"kept")["CiphertextBlob"]
    for node in range(cluster.size):
        cluster.kill(node)
    # A lone node cannot become ready before a quorum is back: start all, then wait.
    for node in range(cluster.size):
        cluster.restart(node, wait=False)
    for node in range(cluster.size):
        wait_for(lambda n=node: cluster.ready(n), 60, what=f"node {node} ready")
        wait_for(lambda n=node: _all_present(cluster, n, key_ids), 30,
                 what=f"keys on node {node}")
    assert cluster.client(2).decrypt(CiphertextBlob=blob)["Plaintext"] == b"kept"
    _create_keys(cluster, 1, 1)



def test_a_decrypt_during_the_election_waits_for_the_new_leader(own_cluster: Cluster) -> None:
    # The failover rule: crypto on a surviving node continues through the election,
    # delayed by the audit commit wait, not refused. The election is held open by freezing
    # the third node, so the request surely arrives while its node knows no leader.
    cluster = own_cluster
    key = cluster.client(0, retries=5).create_key()["KeyMetadata"]["KeyId"]
    blob = cluster.client(0, retries=5).encrypt(KeyId=key, Plaintext=b"e")["CiphertextBlob"]
    leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
    asked, frozen = [n for n in range(cluster.size) if n != leader]
    for node in (asked, frozen):  # the key has reached both
        wait_for(lambda n=node: cluster.client(n).decrypt(CiphertextBlob=blob), 20,
                 what="the key on every node")
    cluster.kill(leader)
    os.kill(cluster.pid(frozen), signal.SIGSTOP)
    try:
        # The survivor still names the dead leader (no quorum to elect another) but is
        # no longer connected to it.
        time.sleep(0.5)
        answer: dict[str, object] = {}

        def decrypt() -> None:
            started = time.monotonic()
            try:
                answer["plaintext"] = cluster.client(asked, retries=1).decrypt(
                    CiphertextBlob=blob)["Plaintext"]
            except ClientError as error:
                answer["error"] = error.response["Error"]["Code"]
            answer["seconds"] = time.monotonic() - started

        request = threading.Thread(target=decrypt)
        request.start()
        time.sleep(0.3)
    finally:
        os.kill(cluster.pid(frozen), signal.SIGCONT)
    request.join(timeout=30)
    assert answer.get("plaintext") == b"e", answer
    assert answer["seconds"] >= 0.25  # it waited for the election
    cluster.restart(leader)
