"""Faults injected into a running cluster, one at a time, for a bounded time.

Kinds:
    kill-random / kill-leader        SIGKILL a node, then restart it (same data dir)
    freeze-random / freeze-leader    SIGSTOP a node, then SIGCONT
    partition-random / partition-leader
                                     cut a node off from its peers (namespaces: every
                                     Raft link of the node is taken down; its clients
                                     still reach it). Fallback without namespaces:
                                     SIGSTOP of the node's peers, which leaves it alone
                                     in a minority exactly as a partition would, while
                                     the majority side is frozen rather than serving.
    partition-link                   namespaces only: cut the link between the leader
                                     and one follower; the third node still sees both

Each fault is a window [injected, healed] plus the time the cluster took to be
whole again (every node ready, a leader with quorum). Every fault is undone before
the next starts, and `heal_everything()` undoes whatever is left, whatever happened.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass, field

from tests.chaos.netns import Topology
from tests.chaos.nodes import continue_all
from tests.integration.harness import Cluster, _alive

NETNS_KINDS = ("kill-random", "kill-leader", "freeze-random", "freeze-leader",
               "partition-random", "partition-leader", "partition-link")
FALLBACK_KINDS = ("kill-random", "kill-leader", "freeze-random", "freeze-leader",
                  "partition-random", "partition-leader")


@dataclass
class FaultWindow:
    kind: str
    targets: list[int]
    injected: float
    healed: float = 0.0
    recovered: float = 0.0  # whole again: every node ready and a leader with quorum
    how: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "targets": [f"node-{t + 1}" for t in self.targets],
                "how": self.how, "injected": round(self.injected, 3),
                "held_s": round(self.healed - self.injected, 2),
                "recovery_s": round(self.recovered - self.healed, 2) if self.recovered else None,
                "note": self.note}


@dataclass
class FaultInjector:
    cluster: Cluster
    topology: Topology | None
    rng: random.Random
    hold: tuple[float, float] = (3.0, 7.0)
    calm: tuple[float, float] = (1.5, 3.0)
    recovery_timeout: float = 60.0
    windows: list[FaultWindow] = field(default_factory=list)
    _stopped: set[int] = field(default_factory=set)
    _killed: set[int] = field(default_factory=set)

    @property
    def kinds(self) -> tuple[str, ...]:
        return NETNS_KINDS if self.topology is not None else FALLBACK_KINDS

    def run(self, until: float, max_faults: int = 10_000) -> None:
        """Inject faults, round-robin over the kinds in a shuffled order, until `until`;
        the first round is always completed, so every kind runs at least once."""
        order = list(self.kinds)
        self.rng.shuffle(order)
        first_round = len(order)
        count = 0
        while (time.time() < until or count < first_round) and count < max_faults:
            if not order:
                order = list(self.kinds)
                self.rng.shuffle(order)
            self.inject(order.pop(0), max(until, time.time() + self.hold[1]))
            count += 1
            self._sleep(self.rng.uniform(*self.calm), max(until, time.time() + self.calm[1]))

    def _sleep(self, seconds: float, until: float) -> None:
        time.sleep(max(0.0, min(seconds, until - time.time())))

    def leader(self) -> int:
        found = self.cluster.leader()
        if found is None:
            found = self.wait_whole()
        return found if found is not None else self.rng.randrange(self.cluster.size)

    def inject(self, kind: str, until: float) -> FaultWindow:
        size = self.cluster.size
        target = self.leader() if kind.endswith("-leader") or kind == "partition-link" \
            else self.rng.randrange(size)
        hold = self.rng.uniform(*self.hold)
        window = FaultWindow(kind, [target], time.time())
        self.windows.append(window)
        try:
            if kind.startswith("kill"):
                window.how = "SIGKILL, restart"
                self._kill(target)
                self._sleep(hold, until + 1)
                self._restart(target)
            elif kind.startswith("freeze"):
                window.how = "SIGSTOP, SIGCONT"
                self._stop(target)
                self._sleep(hold, until + 1)
                self._continue(target)
            elif kind == "partition-link":
                assert self.topology is not None
                other = self.rng.choice([n for n in range(size) if n != target])
                window.targets = [target, other]
                window.how = "netns: Raft link cut"
                self.topology.cut(target + 1, other + 1)
                self._sleep(hold, until + 1)
                self.topology.heal()
            elif self.topology is not None:
                window.how = "netns: every Raft link of the node cut"
                self.topology.isolate(target + 1)
                self._sleep(hold, until + 1)
                self.topology.heal()
            else:
                peers = [n for n in range(size) if n != target]
                window.how = "fallback: SIGSTOP of the node's peers"
                for peer in peers:
                    self._stop(peer)
                self._sleep(hold, until + 1)
                for peer in peers:
                    self._continue(peer)
        finally:
            window.healed = time.time()
            self.heal_everything()
        whole = self.wait_whole()
        if whole is None:
            window.note = f"not whole again within {self.recovery_timeout:.0f}s"
        else:
            window.recovered = time.time()
        return window

    def _kill(self, node: int) -> None:
        self._killed.add(node)
        self.cluster.kill(node)

    def _restart(self, node: int) -> None:
        self.cluster.restart(node, wait=False)
        self._killed.discard(node)

    def _stop(self, node: int) -> None:
        os.kill(self.cluster.pid(node), signal.SIGSTOP)
        self._stopped.add(node)

    def _continue(self, node: int) -> None:
        os.kill(self.cluster.pid(node), signal.SIGCONT)
        self._stopped.discard(node)

    def heal_everything(self) -> None:
        """Undo every fault: thaw, reconnect, restart the dead. Never raises on one node."""
        continue_all(self.cluster)
        self._stopped.clear()
        if self.topology is not None:
            self.topology.heal()
        for node in range(self.cluster.size):
            if node in self._killed or not _alive(self.cluster.pid(node)):
                self.cluster.restart(node, wait=False)
                self._killed.discard(node)

    def wait_whole(self, timeout: float | None = None) -> int | None:
        """Wait until every node is ready and one leads with quorum; the leader or None."""
        deadline = time.monotonic() + (timeout or self.recovery_timeout)
        while time.monotonic() < deadline:
            if all(self.cluster.ready(n) for n in range(self.cluster.size)):
                leader = self.cluster.leader()
                if leader is not None:
                    return leader
            time.sleep(0.25)
        return None
