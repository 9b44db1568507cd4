"""Domain-key rotation on a live 3-node cluster: `kmsctl domain rotate` while clients keep
encrypting, decrypting, signing and MACing; afterwards old ciphertexts decrypt, every token
holds only the new domain key, and a restarted node still serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from kmsd.config import load as load_config
from tests.integration.harness import Cluster, start_cluster, stored_views, wait_for
from tests.integration.test_membership import _kmsd, _new_node, adopt

_LIST_TOKEN = """
import json, os, sys
from pkcs11 import Attribute
from kmsd.hsm.partition import HsmPartition
p = HsmPartition(sys.argv[1], sys.argv[2], open(sys.argv[3]).read().strip())
labels = []
for obj in list(p.session.get_objects()):
    try:
        labels.append(str(obj[Attribute.LABEL]))
    except Exception:
        labels.append("")
print(json.dumps(sorted(labels)))
"""


def token_labels(cluster: Cluster, node: int) -> list[str]:
    """Labels of every object in node `node`'s token (read by a separate process: each node
    has its own SoftHSM2 configuration)."""
    root = os.path.join(cluster.data_dir, f"node-{node + 1}")
    config = load_config(cluster.info["configs"][node])
    result = subprocess.run(
        [sys.executable, "-c", _LIST_TOKEN, config.hsm_module, config.token_label,
         os.path.join(root, "pin")], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "SOFTHSM2_CONF": os.path.join(root, "softhsm2.conf")})
    return json.loads(result.stdout)


def kmsctl(cluster: Cluster, *args: str, timeout: float = 90,
           node: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": cluster.info["access_key_id"],
           "AWS_SECRET_ACCESS_KEY": cluster.info["secret_access_key"],
           "AWS_REGION": cluster.region}
    return subprocess.run([sys.executable, "-m", "kmsd.kmsctl", "--endpoint",
                           cluster.info["admin_endpoints"][node], *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


class Load:
    """Clients on every node, without SDK retries, until stopped: each failure counts."""

    def __init__(self, cluster: Cluster, keys: dict[str, str], user: dict[str, str]) -> None:
        self.cluster = cluster
        self.keys = keys
        self.user = user
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(node,), daemon=True)
                         for node in range(cluster.size)]

    def _run(self, node: int) -> None:
        client = self.cluster.client(node, retries=1)
        as_user = self.cluster.as_user(node, self.user)
        step = 0
        while not self._stop.is_set():
            step += 1
            try:
                blob = client.encrypt(KeyId=self.keys["sym"], Plaintext=b"p%d" % step,
                                      EncryptionContext={"n": str(node)})["CiphertextBlob"]
                assert client.decrypt(CiphertextBlob=blob, EncryptionContext={
                    "n": str(node)})["Plaintext"] == b"p%d" % step
                sig = client.sign(KeyId=self.keys["ec"], Message=b"m", MessageType="RAW",
                                  SigningAlgorithm="ECDSA_SHA_256")["Signature"]
                assert client.verify(KeyId=self.keys["ec"], Message=b"m", MessageType="RAW",
                                     Signature=sig,
                                     SigningAlgorithm="ECDSA_SHA_256")["SignatureValid"]
                client.generate_mac(KeyId=self.keys["hmac"], Message=b"m",
                                    MacAlgorithm="HMAC_SHA_256")
                as_user.generate_data_key(KeyId=self.keys["sym"], KeySpec="AES_256")
                if step % 5 == 0:
                    client.sign(KeyId=self.keys["rsa"], Message=b"m", MessageType="RAW",
                                SigningAlgorithm="RSASSA_PSS_SHA_256")
                    client.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")
                self.ok += 1
            except Exception as error:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(f"node {node}: {error!r}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def domain_status(cluster: Cluster, node: int = 0) -> dict[str, Any]:
    return cluster.admin_get(node, "/v1/domain")


@pytest.fixture()
def rotating_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    running = start_cluster(str(tmp_path_factory.mktemp("domain-rotation")))
    yield running
    running.stop()


@pytest.fixture()
def rotating_cluster_with_workers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Nodes that serve their API from a worker process each (kmsd.api_workers): the
    workers' own HSM sessions must find each new generation and let the old one go."""
    running = start_cluster(str(tmp_path_factory.mktemp("domain-rotation-workers")),
                            extra_args=("--api-workers", "1"))
    yield running
    running.stop()


def test_domain_rotation_rewraps_everything_online(rotating_cluster_with_workers: Cluster
                                                   ) -> None:
    cluster = rotating_cluster_with_workers
    kms = cluster.client(0)
    keys = {
        "sym": kms.create_key()["KeyMetadata"]["KeyId"],
        "rsa": kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"],
        "ec": kms.create_key(KeySpec="ECC_NIST_P256",
                             KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"],
        "hmac": kms.create_key(KeySpec="HMAC_256",
                               KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"],
    }
    kms.rotate_key_on_demand(KeyId=keys["sym"])
    user = cluster.new_user("rotator-app", {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]})
    old_ciphertext = kms.encrypt(KeyId=keys["sym"], Plaintext=b"before",
                                 EncryptionContext={"a": "b"})["CiphertextBlob"]
    old_signature = kms.sign(KeyId=keys["rsa"], Message=b"before", MessageType="RAW",
                             SigningAlgorithm="RSASSA_PSS_SHA_256")["Signature"]
    old_mac = kms.generate_mac(KeyId=keys["hmac"], Message=b"before",
                               MacAlgorithm="HMAC_SHA_256")["Mac"]
    material_id = kms.describe_key(KeyId=keys["sym"])["KeyMetadata"]["CurrentKeyMaterialId"]
    before = domain_status(cluster)
    assert before["ActiveGeneration"] == 1 and before["Phase"] == "idle"
    assert [g["State"] for g in before["Generations"]] == ["active"]
    blobs_before = before["Generations"][0]["Blobs"]
    # 5 backing keys (two versions of one), one access key for the user and one for the root,
    # and the audit digest signing key.
    assert blobs_before >= 8

    with Load(cluster, keys, user) as load:
        time.sleep(1.0)
        started = time.monotonic()
        result = kmsctl(cluster, "domain", "rotate", "--timeout", "60")
        took = time.monotonic() - started
        time.sleep(1.0)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "rotation requested" in result.stdout
    assert load.failures == [], load.failures[:5]
    assert load.ok > 10
    assert took < 45

    after = domain_status(cluster, 1)
    assert after["ActiveGeneration"] == 2 and after["Phase"] == "idle"
    assert not after["InProgress"]
    states = {g["Generation"]: (g["State"], g["Blobs"]) for g in after["Generations"]}
    assert states[1] == ("retired", 0)
    assert states[2][0] == "active" and states[2][1] >= blobs_before
    new_check = next(g["Check"] for g in after["Generations"] if g["Generation"] == 2)
    assert all(m["Held"] == {"2": new_check} for m in after["Members"])

    for node in range(cluster.size):
        labels = token_labels(cluster, node)
        assert [label for label in labels if label.startswith("kmsd-")] == \
            ["kmsd-domain-key-g2"], labels

    for node in range(cluster.size):
        client = cluster.client(node)
        assert client.decrypt(CiphertextBlob=old_ciphertext,
                              EncryptionContext={"a": "b"})["Plaintext"] == b"before"
        assert client.verify(KeyId=keys["rsa"], Message=b"before", MessageType="RAW",
                             Signature=old_signature,
                             SigningAlgorithm="RSASSA_PSS_SHA_256")["SignatureValid"]
        assert client.verify_mac(KeyId=keys["hmac"], Message=b"before", Mac=old_mac,
                                 MacAlgorithm="HMAC_SHA_256")["MacValid"]
        cluster.as_user(node, user).list_aliases(Limit=1)
    assert kms.describe_key(KeyId=keys["sym"])["KeyMetadata"]["CurrentKeyMaterialId"] \
        == material_id
    # RSA keys are made in the HSM helper process: it wraps under the new generation too.
    rsa = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    for node in range(cluster.size):
        cluster.client(node).sign(KeyId=rsa, Message=b"after", MessageType="RAW",
                                  SigningAlgorithm="RSASSA_PSS_SHA_256")

    # The audit chain records the operator's request and every step the leader took.
    def rotation_steps() -> list[dict[str, Any]] | None:
        out = os.path.join(cluster.data_dir, "rotation-audit.jsonl")
        exported = kmsctl(cluster, "audit", "export", "--event", "RotateDomainKey",
                          "--out", out)
        assert exported.returncode == 0, exported.stderr
        with open(out) as handle:
            events = [json.loads(line) for line in handle if line.strip()]
        steps = [e["additionalEventData"]["step"] for e in events]
        return events if steps == ["requested", "begun", "activated", "retired"] else None

    events = wait_for(rotation_steps, 20, what="the rotation's audit records")
    assert events[0]["userIdentity"]["type"] == "Root"
    assert {k: events[2]["additionalEventData"][k] for k in ("generation", "checkValue")} \
        == {"generation": 2, "checkValue": new_check}

    # A restarted node comes back with only the new generation and serves.
    cluster.kill(2)
    cluster.restart(2)
    restarted = cluster.client(2)
    assert restarted.decrypt(CiphertextBlob=old_ciphertext,
                             EncryptionContext={"a": "b"})["Plaintext"] == b"before"
    assert restarted.sign(KeyId=keys["ec"], Message=b"after", MessageType="RAW",
                          SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    status = wait_for(lambda: cluster.node_status(2), 10, what="node status")
    assert status["hsm"]["domain_generations"] == {"2": new_check}
    assert status["hsm"]["domain_key_verified"] is True

    # Re-sealing opened the access keys' secrets in the leader's memory only: no file, log or
    # record holds them.
    secrets = [user["secret_access_key"].encode(), cluster.info["secret_access_key"].encode()]
    for directory, _, names in os.walk(cluster.data_dir):
        for name in names:
            for content in stored_views(os.path.join(directory, name)):
                assert not any(secret in content for secret in secrets), name

    # So does the whole cluster, started again on the same data dirs (`kmsd init` seals a new
    # root access key under the new generation).
    cluster.stop()
    again = start_cluster(cluster.data_dir)
    try:
        for node in range(again.size):
            assert again.client(node).decrypt(
                CiphertextBlob=old_ciphertext,
                EncryptionContext={"a": "b"})["Plaintext"] == b"before"
        assert domain_status(again)["ActiveGeneration"] == 2
    finally:
        again.stop()


def cloning_waits_for(cluster: Cluster, leader: int, member: int) -> bool:
    """`leader` reports that its rotation is cloning the new key and waits for `member`."""
    status = domain_status(cluster, leader)
    return (status["Phase"] == "cloning"
            and f"node-{member + 1}" in (status["LeaderProgress"] or ""))


def test_rotation_waits_for_a_member_that_is_down_and_survives_a_leader_change(
        rotating_cluster: Cluster) -> None:
    cluster = rotating_cluster
    kms = cluster.client(0)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    ciphertext = kms.encrypt(KeyId=key_id, Plaintext=b"kept")["CiphertextBlob"]
    leader = wait_for(cluster.leader, 20, what="a leader")
    down, other = [n for n in range(cluster.size) if n != leader]
    cluster.kill(down)

    requested = kmsctl(cluster, "domain", "rotate", "--no-wait", node=leader)
    assert requested.returncode == 0, requested.stderr
    wait_for(lambda: cloning_waits_for(cluster, leader, down), 20,
             what="the leader to wait for a member")
    # Nothing was re-wrapped while a member lacks the new key.
    status = domain_status(cluster, leader)
    assert status["ActiveGeneration"] == 1
    assert {g["Generation"]: g["State"] for g in status["Generations"]} == {1: "active",
                                                                            2: "pending"}

    # The leader goes down and the member comes back: a new leader (which holds the pending
    # key, or abandons it and starts over with a new generation) goes on, and waits in turn
    # for the old leader, still a member.
    cluster.kill(leader)
    cluster.restart(down, wait=False)
    new_leader = wait_for(lambda: cluster.leader([other, down]), 60, what="a new leader")
    wait_for(lambda: cloning_waits_for(cluster, new_leader, leader), 30,
             what="the new leader to wait for the old one")
    cluster.restart(leader, wait=False)
    for node in range(cluster.size):
        wait_for(lambda n=node: cluster.ready(n), 60, what=f"node {node} ready")

    def finished() -> dict[str, Any] | None:
        status = domain_status(cluster, other)
        return status if status["Phase"] == "idle" and status["ActiveGeneration"] > 1 else None

    final = wait_for(finished, 45, interval=0.5, what="the rotation to finish")
    active = final["ActiveGeneration"]
    check = next(g["Check"] for g in final["Generations"] if g["Generation"] == active)
    assert all(m["Held"] == {str(active): check} for m in final["Members"])
    assert {g["State"] for g in final["Generations"] if g["Generation"] != active} <= \
        {"retired", "abandoned"}
    for node in range(cluster.size):
        assert cluster.client(node).decrypt(CiphertextBlob=ciphertext)["Plaintext"] == b"kept"
        labels = [label for label in token_labels(cluster, node) if label.startswith("kmsd-")]
        assert labels == [f"kmsd-domain-key-g{active}"], labels

    # A node joining after the rotation receives the live generation, and serves.
    token = cluster.admin(other, "POST", "/v1/cluster/join-tokens", b"{}")["JoinToken"]
    node4 = _new_node(cluster, 4)
    joined = _kmsd("join", "--config", node4.config_path, "--token", token,
                   "--via", cluster.info["admin_endpoints"][other])
    assert joined.returncode == 0, joined.stderr
    adopt(cluster, node4)
    cluster.restart(3)
    assert cluster.client(3).decrypt(CiphertextBlob=ciphertext)["Plaintext"] == b"kept"
    assert [label for label in token_labels(cluster, 3) if label.startswith("kmsd-")] == \
        [f"kmsd-domain-key-g{active}"]
