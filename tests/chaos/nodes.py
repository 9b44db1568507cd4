"""Starting the chaos run's cluster: in network namespaces when the kernel allows it,
else `kmsd dev` on 127.0.0.1 through the integration harness.

In namespaces each node is a `kmsd serve --config` process run by `ip netns exec`
(which execs, so the pid we hold is the node's own). The node files, tokens, the
domain key clone and the first access key are made by kmsd's own dev cluster code
(`kmsd.dev.cluster`); only the listen addresses differ, and the processes start
inside their namespaces. Every process started here is stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from kmsd.dev.cluster import DevCluster, DevClusterOptions, DevNode
from tests.chaos.netns import Topology
from tests.integration.harness import Cluster, wait_for

BASE_PORT = 7700


@dataclass
class NetnsNode(DevNode):
    client_ip: str = ""
    raft_ip: str = ""
    namespace: str = ""

    @property
    def raft_address(self) -> str:
        return f"{self.raft_ip}:{self.base_port + 200 + self.index - 1}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.client_ip}:{self.api_port}"

    @property
    def admin_endpoint(self) -> str:
        return f"http://{self.client_ip}:{self.admin_port}"


class NetnsDevCluster(DevCluster):
    """kmsd's dev cluster, with each node listening on its namespace's addresses."""

    def __init__(self, options: DevClusterOptions, topology: Topology) -> None:
        super().__init__(options)
        self.topology = topology
        self.nodes = [NetnsNode(i, os.path.join(self.root, f"node-{i}"), options.base_port,
                                client_ip=topology.client_ip(i), raft_ip=topology.raft_ip(i),
                                namespace=topology.namespace(i))
                      for i in range(1, options.nodes + 1)]
        self.spawned: list[subprocess.Popen] = []

    def prepare(self) -> None:
        super().prepare()  # files, tokens, domain key clones, `kmsd init`: no network needed
        for node in self.nodes:
            assert isinstance(node, NetnsNode)
            with open(node.config_path) as handle:
                text = handle.read()
            text = text.replace('listen = "127.0.0.1:', f'listen = "{node.client_ip}:')
            with open(node.config_path, "w") as handle:
                handle.write(text)

    def spawn(self, node: NetnsNode) -> subprocess.Popen:
        log = open(os.path.join(node.root, "node.log"), "ab")  # noqa: SIM115
        process = subprocess.Popen(
            ["ip", "netns", "exec", node.namespace, sys.executable, "-m", "kmsd.cli", "serve",
             "--config", node.config_path],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        self.spawned.append(process)
        node.process = process
        return process

    def start(self) -> None:
        for node in self.nodes:
            assert isinstance(node, NetnsNode)
            self.spawn(node)


class NetnsCluster(Cluster):
    """The harness's Cluster over nodes that run in namespaces: restart and stop differ."""

    dev: NetnsDevCluster

    def restart(self, node: int, wait: bool = True) -> None:
        target = self.dev.nodes[node]
        assert isinstance(target, NetnsNode)
        process = self.dev.spawn(target)
        self.info["pids"][node] = process.pid
        if wait:
            wait_for(lambda: self.ready(node), 90, what=f"node {node} to be ready again")

    def stop(self) -> None:
        stop_processes(self.dev.spawned)


def stop_processes(processes: list[subprocess.Popen], timeout: float = 20.0) -> None:
    """SIGCONT (a frozen node cannot act on SIGTERM), SIGTERM, then SIGKILL; by pid."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(process.pid, sig)
            except ProcessLookupError:
                break
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_in_namespaces(root: str, topology: Topology, nodes: int = 3) -> NetnsCluster:
    dev = NetnsDevCluster(DevClusterOptions(nodes=nodes, data_dir=root, base_port=BASE_PORT),
                          topology)
    try:
        dev.prepare()
        dev.start()
        dev.wait_ready(timeout=120)
        dev.wait_credentials(timeout=120)
    except BaseException:
        stop_processes(dev.spawned)
        raise
    first = dev.nodes[0].process
    assert first is not None
    cluster = NetnsCluster(info=dev.summary(), process=first, data_dir=root)
    cluster.dev = dev
    return cluster


def node_pids(cluster: Cluster) -> list[int]:
    return [int(pid) for pid in cluster.info["pids"]]


def continue_all(cluster: Cluster) -> None:
    """SIGCONT every node (harmless on a running one)."""
    for pid in node_pids(cluster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
