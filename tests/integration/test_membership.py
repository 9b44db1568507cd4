"""Growing and shrinking a running cluster: join tokens, HSM-to-HSM domain key transfer,
Raft membership changes, removal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kmsd.dev.cluster import DevClusterOptions, DevNode, init_token, write_node_files
from tests.integration.harness import Cluster, _ports_free, start_cluster, wait_for


def _new_node(cluster: Cluster, index: int) -> DevNode:
    base = int(cluster.info["endpoints"][0].rsplit(":", 1)[1])
    node = DevNode(index, os.path.join(cluster.data_dir, f"node-{index}"), base)
    ports = [node.api_port, node.admin_port, int(node.raft_address.rsplit(":", 1)[1])]
    if not _ports_free(ports):
        pytest.skip(f"ports {ports} are taken on this machine right now")
    existing = [DevNode(i, "", base) for i in range(1, cluster.size + 1)]
    write_node_files(node, [*existing, node], DevClusterOptions(
        nodes=cluster.size, account_id=cluster.info["account_id"],
        regions=tuple(cluster.info["regions"])), raft_secret="")
    os.remove(os.path.join(node.root, "raft.secret"))  # kmsd join must bring the secret
    init_token(node)
    return node


def adopt(cluster: Cluster, node: DevNode) -> None:
    """Have the harness address a node that joined (started with cluster.restart)."""
    cluster.info["endpoints"].append(node.endpoint)
    cluster.info["admin_endpoints"].append(node.admin_endpoint)
    cluster.info["configs"].append(node.config_path)
    cluster.info["pids"].append(0)


def _kmsd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmsd.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_a_fourth_node_joins_serves_and_a_member_is_removed(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = start_cluster(str(tmp_path_factory.mktemp("grow")))
    try:
        key = cluster.client(0).create_key()["KeyMetadata"]
        blob = cluster.client(1).encrypt(KeyId=key["KeyId"], Plaintext=b"grow")["CiphertextBlob"]
        token = cluster.admin(0, "POST", "/v1/cluster/join-tokens",
                              json.dumps({"TtlSeconds": 600}).encode())["JoinToken"]
        node4 = _new_node(cluster, 4)
        joined = _kmsd("join", "--config", node4.config_path, "--token", token,
                       "--via", cluster.info["admin_endpoints"][1])
        assert joined.returncode == 0, joined.stderr
        report = json.loads(joined.stdout)
        assert report["joined"] is True
        with open(os.path.join(node4.root, "raft.secret")) as handle:
            assert handle.read()
        assert oct(os.stat(os.path.join(node4.root, "raft.secret")).st_mode & 0o777) == "0o600"
        # The token works once.
        again = _kmsd("join", "--config", node4.config_path, "--token", token,
                      "--via", cluster.info["admin_endpoints"][0])
        assert again.returncode != 0
        adopt(cluster, node4)
        cluster.restart(3)
        assert cluster.client(3).decrypt(CiphertextBlob=blob)["Plaintext"] == b"grow"
        made_on_4 = cluster.client(3).create_key()["KeyMetadata"]["KeyId"]
        wait_for(lambda: cluster.client(0).describe_key(KeyId=made_on_4), 10,
                 what="a key made on the new node")
        members = cluster.admin(0, "GET", "/v1/cluster/members")["members"]
        assert sorted(m["node_id"] for m in members) == ["node-1", "node-2", "node-3", "node-4"]
        status = cluster.node_status(3)
        assert status is not None and status["hsm"]["domain_key_verified"] is True

        env = {**os.environ, "AWS_ACCESS_KEY_ID": cluster.info["access_key_id"],
               "AWS_SECRET_ACCESS_KEY": cluster.info["secret_access_key"],
               "KMSD_ADMIN_ENDPOINT": cluster.info["admin_endpoints"][0]}
        leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
        victim = next(n for n in (1, 2) if n != leader)
        removed = subprocess.run([sys.executable, "-m", "kmsd.kmsctl", "cluster", "remove",
                                  f"node-{victim + 1}"], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert removed.returncode == 0, removed.stderr
        cluster.kill(victim)
        members = cluster.admin(0, "GET", "/v1/cluster/members")["members"]
        survivors = sorted({"node-1", "node-2", "node-3", "node-4"} - {f"node-{victim + 1}"})
        assert sorted(m["node_id"] for m in members) == survivors
        for node in sorted({0, 1, 2, 3} - {victim}):
            created = cluster.client(node, retries=5).create_key()["KeyMetadata"]["KeyId"]
            wait_for(lambda k=created: cluster.client(3).describe_key(KeyId=k), 10,
                     what="writes after the removal")

        # The leader itself: asked through another member, it hands its role over first.
        leader = wait_for(lambda: cluster.leader(), 20, what="a leader")
        asked = next(n for n in sorted({0, 1, 2, 3} - {victim, leader}))
        removed = subprocess.run(
            [sys.executable, "-m", "kmsd.kmsctl", "cluster", "remove", f"node-{leader + 1}"],
            env={**env, "KMSD_ADMIN_ENDPOINT": cluster.info["admin_endpoints"][asked]},
            capture_output=True, text=True, timeout=90)
        assert removed.returncode == 0, removed.stderr
        cluster.kill(leader)
        remaining = sorted({0, 1, 2, 3} - {victim, leader})
        wait_for(lambda: cluster.leader(remaining), 20, what="a leader among the rest")
        members = cluster.admin(asked, "GET", "/v1/cluster/members")["members"]
        assert sorted(m["node_id"] for m in members) == [f"node-{n + 1}" for n in remaining]
        for node in remaining:
            created = cluster.client(node, retries=5).create_key()["KeyMetadata"]["KeyId"]
            for other in remaining:
                wait_for(lambda k=created, o=other: cluster.client(o).describe_key(KeyId=k),
                         10, what="writes after removing the leader")
    finally:
        cluster.stop()


def test_join_is_refused_with_a_bad_token_or_another_domain_key(cluster: Cluster) -> None:
    node = _new_node(cluster, 9)
    refused = _kmsd("join", "--config", node.config_path, "--token", "kmsd-join-made-up",
                    "--via", cluster.info["admin_endpoints"][0])
    assert refused.returncode != 0
    assert "AccessDeniedException" in refused.stderr
    # A token holding a domain key of its own never joins.
    made = _kmsd("hsm", "init-domain-key", "--config", node.config_path)
    assert made.returncode == 0, made.stderr
    token = cluster.admin(0, "POST", "/v1/cluster/join-tokens", b"{}")["JoinToken"]
    other = _kmsd("join", "--config", node.config_path, "--token", token,
                  "--via", cluster.info["admin_endpoints"][0])
    assert other.returncode != 0
    assert "another domain key" in other.stderr
    assert sorted(m["node_id"] for m in cluster.admin(0, "GET", "/v1/cluster/members")
                  ["members"]) == ["node-1", "node-2", "node-3"]
