"""HTTPS with the dev CA, and a Raft port that gives nothing to a peer without the secret."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request

import boto3
import pytest
from botocore.exceptions import SSLError
from pysyncobj.utility import TcpUtility, UtilityException

from cluster import raft_wire
from tests.integration.harness import Cluster, start_cluster


def test_tls_clients_verify_the_dev_ca(tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster = start_cluster(str(tmp_path_factory.mktemp("tls")), extra_args=("--tls",))
    try:
        assert cluster.info["ca_bundle"]
        assert all(e.startswith("https://") for e in cluster.info["endpoints"])
        key = cluster.client(0).create_key()["KeyMetadata"]
        blob = cluster.client(1).encrypt(KeyId=key["KeyId"], Plaintext=b"tls")["CiphertextBlob"]
        assert cluster.client(2).decrypt(CiphertextBlob=blob)["Plaintext"] == b"tls"
        assert cluster.admin(1, "GET", "/v1/node/status")["node_id"] == "node-2"
        # Without the CA the certificate does not verify.
        untrusted = boto3.client(
            "kms", endpoint_url=cluster.info["endpoints"][0], region_name=cluster.region,
            aws_access_key_id=cluster.info["access_key_id"],
            aws_secret_access_key=cluster.info["secret_access_key"])
        with pytest.raises(SSLError):
            untrusted.list_keys()
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(cluster.info["endpoints"][0] + "/healthz", timeout=3,
                                   context=ssl.create_default_context())
        with urllib.request.urlopen(cluster.info["endpoints"][0] + "/metrics", timeout=3,
                                    context=cluster.ssl_context) as response:
            assert b"kmsd_tls_certificate_expiry_timestamp_seconds" in response.read()
    finally:
        cluster.stop()


def _raft_address(cluster: Cluster, node: int) -> str:
    with open(cluster.info["configs"][node]) as handle:
        for line in handle:
            if line.startswith("address = "):
                return line.split('"')[1]
    raise AssertionError("no raft address")


@pytest.mark.parametrize("password", [None, "not-the-cluster-secret"])
def test_raft_port_refuses_peers_without_the_secret(cluster: Cluster,
                                                    password: str | None) -> None:
    address = _raft_address(cluster, 0)
    utility = TcpUtility(password=password, timeout=3)
    # Reading status, adding a voting member and removing one all need the secret.
    for command in (["status"], ["add", "127.0.0.1:1"], ["remove", _raft_address(cluster, 1)]):
        with pytest.raises(UtilityException):
            utility.executeCommand(address, command)
    # The same call with the secret works: the refusals above are the password's doing.
    # (kmsd's Raft wire is AES-GCM, cluster/raft_wire.py: pysyncobj's own client speaks
    # Fernet and is refused even with the secret.)
    import os

    with open(os.path.join(os.path.dirname(cluster.info["configs"][0]), "raft.secret")) as f:
        secret = f.read().strip()
    assert raft_wire.utility(secret, timeout=3).executeCommand(address, ["status"])["state"] \
        in (0, 1, 2)
    with pytest.raises(UtilityException):
        TcpUtility(password=secret, timeout=3).executeCommand(address, ["status"])
    status = cluster.node_status(0)
    assert status is not None
    assert sorted(status["raft"]["partners_connected"]) == sorted(
        _raft_address(cluster, n) for n in (1, 2))
    members = cluster.admin(0, "GET", "/v1/cluster/members")["members"]
    assert len(members) == 3
