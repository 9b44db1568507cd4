"""A node with API worker processes (`[api] workers`): the API port is served by the workers,
each with its own HSM login and a copy of the state fed by the node's primary process.

These start a real one-node cluster with two workers and talk to it through boto3 on fresh
connections, which the kernel spreads over the workers (SO_REUSEPORT).
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.integration.harness import Cluster, _alive, start_cluster, wait_for
from tests.integration.test_audit import records

WORKERS = 2


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(str(tmp_path_factory.mktemp("api-workers")), nodes=1,
                            extra_args=("--api-workers", str(WORKERS)))
    yield running
    running.stop()


def worker_pids(cluster: Cluster) -> list[int]:
    status = cluster.node_status(0)
    assert status is not None
    return list(status["api_workers"]["pids"])


def request_lines(cluster: Cluster) -> list[dict[str, Any]]:
    path = os.path.join(os.path.dirname(cluster.info["configs"][0]), "node.log")
    lines = []
    with open(path, errors="replace") as handle:
        for line in handle:
            if '"event": "request"' in line:
                lines.append(json.loads(line))
    return lines


def test_the_workers_serve_the_api_port_and_every_request_is_audited_once(
        node: Cluster) -> None:
    assert len(worker_pids(node)) == WORKERS
    key_id = node.client(0).create_key()["KeyMetadata"]["KeyId"]
    answered: list[str] = []
    for _ in range(40):  # each on a new connection: the kernel picks the process
        reply = node.client(0).encrypt(KeyId=key_id, Plaintext=b"spread")
        answered.append(reply["ResponseMetadata"]["RequestId"])
        plain = node.client(0).decrypt(CiphertextBlob=reply["CiphertextBlob"])
        assert plain["Plaintext"] == b"spread"
        answered.append(plain["ResponseMetadata"]["RequestId"])

    # An access line is held until its loop's next turn (kmsd.log_setup), which may come
    # after the answer has reached the client: wait for the last one.
    def all_logged() -> Counter[Any] | None:
        served = Counter(line.get("api_worker") for line in request_lines(node)
                         if line["request_id"] in set(answered))
        return served if sum(served.values()) >= len(answered) else None
    served_by = wait_for(all_logged, 10, what="an access line for every answered request")
    # Only workers serve the API; the kernel spread the connections over both.
    assert set(served_by) == set(range(WORKERS)), served_by
    assert sum(served_by.values()) == len(answered)

    def all_recorded() -> Counter[str] | None:
        counts = Counter(r["event"]["requestID"] for r in records(node, 0))
        return counts if all(counts[r] for r in answered) else None
    counts = wait_for(all_recorded, 20, what="every answered request in the audit chain")
    assert all(counts[r] == 1 for r in answered)
    assert node.admin(0, "GET", "/v1/audit/verify")["ok"]


def test_a_write_is_seen_by_every_worker_once_it_is_answered(node: Cluster) -> None:
    for _ in range(15):
        key_id = node.client(0).create_key()["KeyMetadata"]["KeyId"]
        # New connections, so likely another process than the one that created the key.
        blob = node.client(0, retries=1).encrypt(KeyId=key_id, Plaintext=b"x")["CiphertextBlob"]
        node.client(0, retries=1).disable_key(KeyId=key_id)
        with pytest.raises(ClientError) as refused:
            node.client(0, retries=1).decrypt(CiphertextBlob=blob)
        assert refused.value.response["Error"]["Code"] == "DisabledException"
        node.client(0, retries=1).enable_key(KeyId=key_id)
        assert node.client(0, retries=1).decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_readiness_and_metrics_on_the_api_port_are_the_nodes(node: Cluster) -> None:
    node.client(0).list_keys()
    endpoint = node.info["endpoints"][0]
    with urllib.request.urlopen(endpoint + "/readyz", timeout=5) as response:
        assert json.loads(response.read())["ready"] is True

    def counted() -> float:
        with urllib.request.urlopen(endpoint + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("kmsd_requests_total{"))
    # Workers report what they answered to the primary, which renders the node's metrics.
    wait_for(lambda: counted() >= 40, 10, what="the workers' requests in /metrics")


def test_a_killed_worker_is_replaced_and_the_node_keeps_serving(node: Cluster) -> None:
    key_id = node.client(0).create_key()["KeyMetadata"]["KeyId"]
    victim = worker_pids(node)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in worker_pids(node) and len(worker_pids(node)) == WORKERS,
             30, what="a new worker in place of the killed one")
    for _ in range(20):
        blob = node.client(0).encrypt(KeyId=key_id, Plaintext=b"y")["CiphertextBlob"]
        assert node.client(0).decrypt(CiphertextBlob=blob)["Plaintext"] == b"y"


def test_the_workers_leave_with_their_primary(tmp_path_factory: pytest.TempPathFactory
                                              ) -> None:
    cluster = start_cluster(str(tmp_path_factory.mktemp("api-workers-orphans")), nodes=1,
                            extra_args=("--api-workers", "1"))
    try:
        workers = worker_pids(cluster)
        assert workers
        cluster.kill(0)
        wait_for(lambda: not any(_alive(pid) for pid in workers), 15,
                 what="the workers to exit after their primary died")
    finally:
        cluster.stop()
