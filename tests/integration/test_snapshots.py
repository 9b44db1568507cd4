"""State backups (kmsctl snapshot save / kmsd restore) and a wiped follower catching up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.integration.harness import Cluster, start_cluster, wait_for


def _wipe_node_state(root: str) -> None:
    """Remove a node's Raft journal, snapshot and audit segments; keep token, config, PIN."""
    for part in ("raft", "audit"):
        shutil.rmtree(os.path.join(root, "data", part), ignore_errors=True)


def test_snapshot_save_and_restore_into_a_fresh_cluster(
        tmp_path_factory: pytest.TempPathFactory, tmp_path) -> None:
    data_dir = str(tmp_path_factory.mktemp("backup"))
    first = start_cluster(data_dir)
    try:
        key = first.client(0).create_key(Description="backed up")["KeyMetadata"]
        first.client(1).create_alias(AliasName="alias/backed-up", TargetKeyId=key["KeyId"])
        blob = first.client(2).encrypt(KeyId="alias/backed-up",
                                       Plaintext=b"restore me")["CiphertextBlob"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": first.info["access_key_id"],
               "AWS_SECRET_ACCESS_KEY": first.info["secret_access_key"],
               "KMSD_ADMIN_ENDPOINT": first.info["admin_endpoints"][0]}
        saved = subprocess.run([sys.executable, "-m", "kmsd.kmsctl", "snapshot", "save",
                                str(tmp_path / "state.snapshot")], env=env,
                               capture_output=True, text=True, timeout=60)
        assert saved.returncode == 0, saved.stderr
    finally:
        first.stop()
    backup = (tmp_path / "state.snapshot").read_bytes()
    assert oct(os.stat(tmp_path / "state.snapshot").st_mode & 0o777) == "0o600"
    assert b"restore me" not in backup
    assert first.info["secret_access_key"].encode() not in backup
    for node in (1, 2, 3):
        _wipe_node_state(os.path.join(data_dir, f"node-{node}"))
    staged = subprocess.run([sys.executable, "-m", "kmsd.cli", "restore",
                             str(tmp_path / "state.snapshot"), "--config",
                             os.path.join(data_dir, "node-1", "node.toml")],
                            capture_output=True, text=True, timeout=60)
    assert staged.returncode == 0, staged.stderr
    assert json.loads(staged.stdout)["keys"] >= 1
    second = start_cluster(data_dir)
    try:
        for node in range(second.size):
            described = wait_for(lambda n=node: second.client(n).describe_key(
                KeyId=key["KeyId"])["KeyMetadata"], 30, what=f"restored key on node {node}")
            assert described["Description"] == "backed up"
        assert second.client(1).decrypt(CiphertextBlob=blob)["Plaintext"] == b"restore me"
        assert second.client(2).describe_key(KeyId="alias/backed-up")["KeyMetadata"][
            "KeyId"] == key["KeyId"]
        # The credentials of the backed-up cluster work again too.
        assert second.client(0, access_key_id=first.info["access_key_id"],
                             secret_access_key=first.info["secret_access_key"]).list_keys()
    finally:
        second.stop()


def test_a_follower_wiped_of_its_data_dir_rejoins_and_catches_up(own_cluster: Cluster) -> None:
    cluster = own_cluster
    leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
    follower = next(n for n in range(cluster.size) if n != leader)
    keys = [cluster.client(leader).create_key()["KeyMetadata"]["KeyId"] for _ in range(3)]
    cluster.kill(follower)
    _wipe_node_state(os.path.dirname(cluster.info["configs"][follower]))
    keys += [cluster.client(leader).create_key()["KeyMetadata"]["KeyId"] for _ in range(2)]
    cluster.restart(follower)
    for key_id in keys:
        wait_for(lambda k=key_id: cluster.client(follower).describe_key(KeyId=k), 30,
                 what="the wiped follower to catch up")
    cluster.client(follower).create_key()


def test_the_journal_stays_bounded_under_steady_traffic(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = start_cluster(str(tmp_path_factory.mktemp("bounded")),
                            extra_args=("--compaction-entries", "100"))
    try:
        key = cluster.client(0).create_key()["KeyMetadata"]["KeyId"]
        journal = os.path.join(cluster.data_dir, "node-2", "data", "raft", "raft.journal")
        sizes = []
        for round_ in range(4):
            for node in range(cluster.size):
                client = cluster.client(node)
                for _ in range(60):
                    client.generate_data_key(KeyId=key, KeySpec="AES_256")
            sizes.append(os.path.getsize(journal))
            log_length = cluster.node_status(1)["raft"]["log_length"]
            assert log_length <= 400, f"round {round_}: {log_length} entries in the log"
        # 720 audited requests went through; the journal was compacted, not grown with them.
        assert os.path.exists(os.path.join(cluster.data_dir, "node-2", "data", "raft",
                                           "raft.snapshot"))
        assert sizes[-1] <= 2 * max(sizes[:2]), sizes
    finally:
        cluster.stop()


def test_a_wiped_node_fetches_the_audit_records_it_missed_from_a_peer(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = start_cluster(str(tmp_path_factory.mktemp("backfill")),
                            extra_args=("--compaction-entries", "60"))
    try:
        key = cluster.client(0).create_key()["KeyMetadata"]["KeyId"]
        leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
        follower = next(n for n in range(cluster.size) if n != leader)
        cluster.kill(follower)
        _wipe_node_state(os.path.dirname(cluster.info["configs"][follower]))
        # Enough traffic that the leader compacts its log: the wiped node gets a snapshot.
        for _ in range(150):
            cluster.client(leader).generate_data_key(KeyId=key, KeySpec="AES_256")
        cluster.restart(follower)
        cluster.client(follower).generate_data_key(KeyId=key, KeySpec="AES_256")

        def verified() -> dict | None:
            report = cluster.admin(follower, "GET", "/v1/audit/verify")
            return report if report["ok"] and report["segment_gap"] is None else None

        report = wait_for(verified, 60, interval=0.5, what="the backfilled audit chain")
        assert report["records"] == report["expected_head"]["seq"] > 150
        other = cluster.admin(leader, "GET", "/v1/audit/verify")
        assert other["ok"] is True
        # A peer route refuses callers without the cluster secret, even with credentials.
        import urllib.error

        with pytest.raises(urllib.error.HTTPError) as excinfo:
            cluster.admin(leader, "GET", "/v1/internal/audit/records?after=0&limit=1")
        assert excinfo.value.code == 400
    finally:
        cluster.stop()
