"""`kmsd dev` and `kmsctl`: start, status, clean stop, restart on the same data dir."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

import pytest

from tests.integration.harness import Cluster, _alive, free_base_port, start_cluster, wait_for


def test_kmsctl_cluster_status(cluster: Cluster) -> None:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": cluster.info["access_key_id"],
           "AWS_SECRET_ACCESS_KEY": cluster.info["secret_access_key"],
           "KMSD_ADMIN_ENDPOINT": cluster.info["admin_endpoints"][1]}

    def status() -> dict:
        out = subprocess.run([sys.executable, "-m", "kmsd.kmsctl", "--json", "cluster", "status"],
                             env=env, capture_output=True, text=True, check=True, timeout=30)
        return json.loads(out.stdout)

    members = wait_for(lambda: (s := status()["members"]) and
                       sum(m["role"] == "leader" for m in s) == 1 and s, 20,
                       what="one leader in kmsctl's view")
    assert [m["node_id"] for m in members] == ["node-1", "node-2", "node-3"]
    assert [m["az"] for m in members] == ["az-1", "az-2", "az-3"]
    assert {m["role"] for m in members} <= {"leader", "follower"}
    assert len({m["term"] for m in members}) == 1
    assert all(isinstance(m["commit_index"], int) and m["commit_index"] > 0 for m in members)
    assert len({m["domain_key_check"] for m in members}) == 1
    table = subprocess.run([sys.executable, "-m", "kmsd.kmsctl", "cluster", "status"], env=env,
                           capture_output=True, text=True, check=True, timeout=30).stdout
    assert "NODE_ID" in table and "node-3" in table
    env["AWS_SECRET_ACCESS_KEY"] = "wrong-secret-wrong-secret-wrong-secret00"
    refused = subprocess.run([sys.executable, "-m", "kmsd.kmsctl", "cluster", "status"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "InvalidSignatureException" in refused.stderr


def test_sigterm_stops_every_node_and_removes_the_temporary_dir() -> None:
    base = free_base_port(3)
    process = subprocess.Popen([sys.executable, "-m", "kmsd.cli", "dev", "--port", str(base)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 90)
    assert ready, "kmsd dev printed nothing"
    info = json.loads(process.stdout.readline())
    assert set(info) >= {"region", "account_id", "endpoints", "admin_endpoints", "pids",
                         "access_key_id", "secret_access_key"}
    assert len(info["endpoints"]) == len(info["pids"]) == 3
    assert info["account_id"] == "111122223333" and info["region"] == "us-east-1"
    data_dir = info["data_dir"]
    assert os.path.isdir(data_dir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    for pid in info["pids"]:
        assert not _alive(pid)
    assert not os.path.exists(data_dir)


def test_restart_on_the_same_data_dir_keeps_the_cluster(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    data_dir = str(tmp_path_factory.mktemp("reuse"))
    fixed = ("--access-key-id", "AKIAFIXEDDEVKEY00001",
             "--secret-access-key", "fixed-dev-secret-fixed-dev-secret-000000")
    first = start_cluster(data_dir, extra_args=fixed)
    try:
        assert first.info["access_key_id"] == "AKIAFIXEDDEVKEY00001"
        key = first.client(0).create_key(Description="survives")["KeyMetadata"]
        blob = first.client(1).encrypt(KeyId=key["KeyId"], Plaintext=b"again")["CiphertextBlob"]
    finally:
        first.stop()
    second = start_cluster(data_dir, extra_args=fixed)
    try:
        described = second.client(2).describe_key(KeyId=key["KeyId"])["KeyMetadata"]
        assert described["Description"] == "survives"
        assert second.client(0).decrypt(CiphertextBlob=blob)["Plaintext"] == b"again"
    finally:
        second.stop()


def test_nodes_notify_systemd_when_ready(tmp_path_factory: pytest.TempPathFactory) -> None:
    import socket

    directory = tmp_path_factory.mktemp("notify")
    path = str(directory / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(30)
    cluster = start_cluster(str(directory / "cluster"), env={"NOTIFY_SOCKET": path})
    try:
        messages = []
        while sum("STATUS=serving as" in m for m in messages) < cluster.size:
            messages.append(receiver.recv(4096).decode())
        # READY=1 once listening (a quorum may be far away), then the status once serving.
        assert sum("READY=1" in m.split("\n") for m in messages) == cluster.size
        assert sorted(m.split("STATUS=serving as ")[1].split("\n")[0] for m in messages
                      if "serving as" in m) == ["node-1", "node-2", "node-3"]
    finally:
        cluster.stop()
        receiver.close()
