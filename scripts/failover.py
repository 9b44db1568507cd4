#!/usr/bin/env python3
"""Leader failover, measured: kill -9 the leader N times, time until writes resume.

Starts its own 3-node dev cluster on 127.0.0.1 (SoftHSM2 tokens in a temporary
folder), then for each round: finds the leader, SIGKILLs it, and measures
(a) the time until a surviving node reports a new leader with a quorum and
(b) the time until a write (CreateKey) through a surviving node succeeds,
then restarts the killed node and waits until it serves again. Every write
acknowledged during the run is checked on every node at the end (lost
acknowledged writes must be 0). Results: bench/results/failover-<date>.json
and .md (median and worst).

Usage: .venv/bin/python scripts/failover.py [--rounds 20] [--port 27700]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import BotoCoreError, ClientError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kmsd.dev.cluster import DevCluster, DevClusterOptions  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "bench", "results")


class Harness:
    @classmethod
    def start(cls, prefix: str, port: int) -> Harness:
        """A fresh 3-node dev cluster in a new temporary folder, once it is ready."""
        cluster = DevCluster(DevClusterOptions(data_dir=tempfile.mkdtemp(prefix=prefix),
                                               base_port=port))
        cluster.prepare()
        cluster.start()
        cluster.wait_ready()
        cluster.wait_credentials()
        return cls(cluster)

    def __init__(self, cluster: DevCluster) -> None:
        self.cluster = cluster
        self.credentials = Credentials(cluster.access_key_id, cluster.secret_access_key)
        self.processes: dict[int, subprocess.Popen] = {
            i: n.process for i, n in enumerate(cluster.nodes) if n.process}

    def client(self, node: int) -> Any:
        return boto3.client(
            "kms", endpoint_url=self.cluster.nodes[node].endpoint, region_name="us-east-1",
            aws_access_key_id=self.cluster.access_key_id,
            aws_secret_access_key=self.cluster.secret_access_key,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=3))

    def status(self, node: int) -> dict[str, Any] | None:
        url = self.cluster.nodes[node].admin_endpoint + "/v1/node/status"
        request = AWSRequest(method="GET", url=url, data=b"")
        SigV4Auth(self.credentials, "kms", "us-east-1").add_auth(request)
        http = urllib.request.Request(url, headers=dict(request.prepare().headers))
        try:
            with urllib.request.urlopen(http, timeout=1) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def leader(self, among: list[int]) -> int | None:
        for node in among:
            status = self.status(node)
            if status and status["raft"]["role"] == "leader" and status["raft"]["has_quorum"]:
                return node
        return None

    def kill(self, node: int) -> None:
        process = self.processes[node]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()

    def restart(self, node: int) -> None:
        config = self.cluster.nodes[node].config_path
        log = open(os.path.join(os.path.dirname(config), "node.log"), "ab")  # noqa: SIM115
        self.processes[node] = subprocess.Popen(
            [sys.executable, "-m", "kmsd.cli", "serve", "--config", config],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = self.status(node)
            if status and status["ready"]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"node {node} did not come back")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def one_round(harness: Harness, acknowledged: list[str]) -> dict[str, float]:
    nodes = list(range(len(harness.cluster.nodes)))
    leader = None
    while leader is None:
        leader = harness.leader(nodes)
    survivors = [n for n in nodes if n != leader]
    killed_at = time.monotonic()
    harness.kill(leader)
    elected: list[float] = []

    def watch_election() -> None:
        # Polled on its own thread: a write attempt may block while no leader exists.
        while not elected and time.monotonic() - killed_at < 60:
            if harness.leader(survivors) is not None:
                elected.append(time.monotonic() - killed_at)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch_election)
    watcher.start()
    written = None
    attempt = 0
    while written is None and time.monotonic() - killed_at < 60:
        try:
            key = harness.client(survivors[attempt % 2]).create_key()["KeyMetadata"]["KeyId"]
            acknowledged.append(key)
            written = time.monotonic() - killed_at
        except (ClientError, BotoCoreError):
            attempt += 1
            time.sleep(0.02)
    watcher.join()
    if written is None or not elected:
        raise RuntimeError("no new leader or no write within 60 s")
    harness.restart(leader)
    return {"killed_node": leader, "new_leader_s": round(elected[0], 3),
            "first_write_s": round(written, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--port", type=int, default=27700)
    args = parser.parse_args()
    harness = Harness.start("kmsd-failover-", args.port)
    cluster = harness.cluster
    acknowledged: list[str] = []
    rounds = []
    try:
        for index in range(args.rounds):
            result = one_round(harness, acknowledged)
            rounds.append(result)
            print(f"round {index + 1}: {result}", flush=True)
        missing = {}
        for node in range(len(cluster.nodes)):
            client = harness.client(node)
            lost = []
            for key in acknowledged:
                try:
                    client.describe_key(KeyId=key)
                except ClientError:
                    lost.append(key)
            missing[f"node-{node + 1}"] = len(lost)
    finally:
        harness.stop()
    elections = [r["new_leader_s"] for r in rounds]
    writes = [r["first_write_s"] for r in rounds]
    now = datetime.datetime.now(datetime.UTC)
    report = {
        "date": now.isoformat(timespec="seconds"), "rounds": rounds,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},
        "new_leader_s": {"median": statistics.median(elections), "worst": max(elections)},
        "first_write_s": {"median": statistics.median(writes), "worst": max(writes)},
        "acknowledged_writes": len(acknowledged), "lost_acknowledged_writes": missing,
        "settings": {"raftMinTimeout": 0.4, "raftMaxTimeout": 1.4,
                     "leaderFallbackTimeout": 3.0, "appendEntriesUseBatch": False},
    }
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"failover-{now:%Y-%m-%d}")
    with open(stem + ".json", "w") as handle:
        json.dump(report, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(f"# Leader failover, {args.rounds} kills ({now:%Y-%m-%d}, "
                     f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f})\n\n"
                     "| measure | median s | worst s |\n|---|---:|---:|\n"
                     f"| new leader with quorum | {report['new_leader_s']['median']:.3f} | "
                     f"{report['new_leader_s']['worst']:.3f} |\n"
                     f"| first acknowledged write | {report['first_write_s']['median']:.3f} | "
                     f"{report['first_write_s']['worst']:.3f} |\n\n"
                     f"Acknowledged writes: {len(acknowledged)}; lost on each node: {missing}\n")
    print(json.dumps({k: report[k] for k in ("new_leader_s", "first_write_s",
                                             "lost_acknowledged_writes")}))
    return 0 if not any(missing.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
