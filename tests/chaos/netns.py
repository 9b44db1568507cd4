"""Network namespaces for a chaos cluster, and the partitions cut into them.

Layout, all named with one run tag and created by `Topology.create()`:

    host ns ── veth ──┐                 switch ns: bridge `br0`
                      br0 ── c1 ─ veth ─ node-1 ns (`cl`: 198.18.S.11, lo: 198.19.S.1)
                          ── c2 ─ veth ─ node-2 ns (`cl`: 198.18.S.12, lo: 198.19.S.2)
                          ── c3 ─ veth ─ node-3 ns (`cl`: 198.18.S.13, lo: 198.19.S.3)
    node-i ns ── veth pair `p<j>`/`p<i>` ── node-j ns      (one per pair: Raft traffic)

Clients (this process, in the host namespace at 198.18.S.1) reach every node's API
over the bridge. Raft runs on each node's loopback address (198.19.S.i/32), routed
to each peer only over the pair's own veth link, so a partition is a set of cut
pair links: clients still reach a cut-off node, as they would a node on the wrong
side of a real partition. 198.18.0.0/15 is the range set aside for network tests
(RFC 2544); only namespaces made here hold those addresses, and the host gets one
directly connected /24 on its veth and no other route.

`close()` deletes every namespace it made, which takes the veths and the bridge
with them, and never raises. `sweep_stale()` removes what an earlier run that died
before its cleanup left behind (namespaces whose owning pid no longer runs).
Never touches an interface or namespace it did not name.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

PREFIX = "kmsdchaos"
CLIENT_NET = "198.18"
RAFT_NET = "198.19"


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20,
                            check=False)
    if check and result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def probe() -> str | None:
    """None when this process may build namespaces, veths and bridges; else why not."""
    if os.geteuid() != 0:
        return "not running as root (ip netns add needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "the iproute2 `ip` command is not installed"
    name = f"{PREFIX}-{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "add", "name", "pa", "type", "veth", "peer", "name", "pb")
        _ip("-n", name, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", name, "link", "set", "dev", "pa", "master", "br0")
        _ip("-n", name, "link", "set", "dev", "br0", "up")
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"the kernel refused a probe namespace: {exc}"
    finally:
        _ip("netns", "del", name, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete namespaces of earlier chaos runs whose process is gone; returns their names."""
    if shutil.which("ip") is None:
        return []
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    removed = []
    for line in listed:
        name = line.split(" ", 1)[0].strip()
        if not name.startswith(PREFIX + "-"):
            continue
        owner = name.split("-")[1]
        if owner.isdigit() and not _alive(int(owner)):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def _free_subnet() -> int:
    used = _ip("-4", "route", "show", "table", "all", check=False).stdout
    used += _ip("-4", "addr", "show", check=False).stdout
    for _ in range(100):
        subnet = secrets.randbelow(254) + 1
        if f"{CLIENT_NET}.{subnet}." not in used and f"{RAFT_NET}.{subnet}." not in used:
            return subnet
    raise NetnsError("no free 198.18.x.0/24 for the chaos network")


@dataclass
class Topology:
    nodes: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = 0
    created: list[str] = field(default_factory=list)
    cut_links: set[tuple[int, int]] = field(default_factory=set)

    # Names and addresses; nodes are numbered from 1.
    def namespace(self, node: int) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.tag}-n{node}"

    @property
    def switch(self) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.tag}-sw"

    @property
    def host_veth(self) -> str:
        return f"kc{self.tag}h"

    @property
    def host_ip(self) -> str:
        return f"{CLIENT_NET}.{self.subnet}.1"

    def client_ip(self, node: int) -> str:
        return f"{CLIENT_NET}.{self.subnet}.{10 + node}"

    def raft_ip(self, node: int) -> str:
        return f"{RAFT_NET}.{self.subnet}.{node}"

    def create(self) -> None:
        """Build the namespaces and links; on any failure, remove what was made and raise."""
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self.created.append(name)
        _ip("-n", name, "link", "set", "dev", "lo", "up")

    def _create(self) -> None:
        self.subnet = _free_subnet()
        sw = self.switch
        self._add_namespace(sw)
        _ip("-n", sw, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "dev", "br0", "up")
        _ip("link", "add", "name", self.host_veth, "type", "veth", "peer", "name", "uplink",
            "netns", sw)
        _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_veth)
        _ip("link", "set", "dev", self.host_veth, "up")
        _ip("-n", sw, "link", "set", "dev", "uplink", "master", "br0")
        _ip("-n", sw, "link", "set", "dev", "uplink", "up")
        for i in range(1, self.nodes + 1):
            ns = self.namespace(i)
            self._add_namespace(ns)
            _ip("-n", ns, "addr", "add", f"{self.raft_ip(i)}/32", "dev", "lo")
            _ip("-n", sw, "link", "add", "name", f"c{i}", "type", "veth", "peer", "name", "cl",
                "netns", ns)
            _ip("-n", sw, "link", "set", "dev", f"c{i}", "master", "br0")
            _ip("-n", sw, "link", "set", "dev", f"c{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.client_ip(i)}/24", "dev", "cl")
            _ip("-n", ns, "link", "set", "dev", "cl", "up")
        for i in range(1, self.nodes + 1):
            for j in range(i + 1, self.nodes + 1):
                _ip("-n", self.namespace(i), "link", "add", "name", f"p{j}", "type", "veth", "peer",
                    "name", f"p{i}", "netns", self.namespace(j))
                self._link_up(i, j)

    def _link_up(self, i: int, j: int) -> None:
        for a, b in ((i, j), (j, i)):
            _ip("-n", self.namespace(a), "link", "set", "dev", f"p{b}", "up")
        for a, b in ((i, j), (j, i)):
            # Re-added on every heal: taking a link down drops the routes through it.
            _ip("-n", self.namespace(a), "route", "replace", f"{self.raft_ip(b)}/32",
                "dev", f"p{b}", "src", self.raft_ip(a))

    # Partitions.
    def cut(self, i: int, j: int) -> None:
        """Cut the Raft link between nodes i and j (both directions)."""
        for a, b in ((i, j), (j, i)):
            _ip("-n", self.namespace(a), "link", "set", "dev", f"p{b}", "down")
        self.cut_links.add((min(i, j), max(i, j)))

    def isolate(self, node: int) -> None:
        """Cut `node` off from every peer; its clients still reach it."""
        for other in range(1, self.nodes + 1):
            if other != node:
                self.cut(node, other)

    def heal(self) -> None:
        for i, j in sorted(self.cut_links):
            self._link_up(i, j)
        self.cut_links.clear()

    def namespaces_left(self) -> list[str]:
        listed = _ip("netns", "list", check=False).stdout
        return [ns for ns in self.created if ns in listed]

    def close(self) -> list[str]:
        """Delete everything this topology made; returns what could not be deleted."""
        for name in reversed(self.created):
            _ip("netns", "del", name, check=False)
        if _ip("link", "show", "dev", self.host_veth, check=False).returncode == 0:
            _ip("link", "del", "dev", self.host_veth, check=False)
        left = self.namespaces_left()
        if _ip("link", "show", "dev", self.host_veth, check=False).returncode == 0:
            left.append(self.host_veth)
        return left
