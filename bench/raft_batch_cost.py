#!/usr/bin/env python3
"""CPU cost of committing audit batches through a 3-node Raft cluster, per record.

Starts three `cluster.raft_node.RaftNode`s, each in its own process (spawned, so
each has its own GIL, as real nodes do), on 127.0.0.1 with temporary data dirs,
and drives the leader with AppendAudit commands shaped like the ones
`kmsd.audit.committer.AuditCommitter` proposes: each record is a real canonical
CloudTrail-shaped Decrypt event (kmsd.audit.record.build_event, unique ids),
the serving node, one (key id, epoch) decision and a usage tuple.

Two workloads:

- `seq` (default): one batch in flight, every batch `--records` records, as the
  committer does when it is saturated. Isolates the cost of one commit.
- `committer`: an AuditCommitter on each proposing node with `--concurrency`
  clients calling commit() in a loop, each first away ~`--gap-ms` (its answer
  travelling back, the next request coming in) and then spinning `--work-us` µs
  on the event loop (the rest of a request's handling), so batch sizes form as
  they do live.

Each process reports its own CPU time (getrusage, every thread of it); the
script sums the three deltas over the measured window (from just before the
first submit to the moment both followers have applied the last entry) and
divides by the records committed (in committer mode, less the synthetic
`--work-us`, which is spent by construction). Log compaction is pushed out of
the window. `--on` picks the proposing node(s): the leader, a follower (its
commands are forwarded to the leader), or all three, as under live load.

    PYTHONPATH=. .venv/bin/python bench/raft_batch_cost.py                 # seq, 10/batch
    PYTHONPATH=. .venv/bin/python bench/raft_batch_cost.py --records 1,10,50
    PYTHONPATH=. .venv/bin/python bench/raft_batch_cost.py --mode committer --concurrency 64

The machine is shared: run several repeats and compare medians taken in one run.
It reports, it never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_DIR not in sys.path:
    sys.path.insert(0, REPO_DIR)

ACCOUNT = "111122223333"
REGION = "us-west-2"


def _cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process, every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _record(node: str, index: int) -> tuple[bytes, str, tuple[tuple[str, int], ...],
                                            tuple[str, ...]]:
    """One audit item as the API layer hands it to the committer."""
    from kmsd.audit.chain import AuditEntry
    from kmsd.audit.record import build_event

    key_id = str(uuid.uuid4())
    request_id, event_id = str(uuid.uuid4()), str(uuid.uuid4())
    event = build_event(
        operation="Decrypt",
        params={"CiphertextBlob": b"\x01" * 180, "EncryptionContext": {"app": "bench"}},
        response=None, error_code=None, error_message=None,
        principal_arn=f"arn:aws:iam::{ACCOUNT}:user/bench-{index % 7}",
        account_id=ACCOUNT, access_key_id="AKIAEXAMPLEBENCH0001", region=REGION,
        source_ip=f"192.0.2.{index % 250}", user_agent="Boto3/1.40.0 md/Botocore#1.40.0",
        request_id=request_id, event_id=event_id, event_time=1_700_000_000.0 + index,
        key_arns=(f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}",))
    entry = AuditEntry.of(event.to_dict(), node)
    usage = (key_id, "Decrypt", event.to_dict()["eventTime"], event_id, request_id)
    return entry.event_bytes, node, ((key_id, 1),), usage


# -- the node process ----------------------------------------------------------------------

def _install_counters() -> Counter[str]:
    """Count the messages this node sends (by type) and its ticks; costs CPU, so only
    with --count, never in the measured figures."""
    import pysyncobj.syncobj
    import pysyncobj.tcp_connection

    counts: Counter[str] = Counter()
    send, tick = pysyncobj.tcp_connection.TcpConnection.send, pysyncobj.syncobj.SyncObj._onTick

    def counting_send(self: Any, message: Any) -> None:
        kind = message.get("type", "?") if isinstance(message, dict) else "handshake"
        if kind == "append_entries":
            kind += " (entries)" if message.get("entries") else " (no entries)"
        counts["sent " + kind] += 1
        send(self, message)

    def counting_tick(self: Any, *args: Any) -> None:
        counts["ticks"] += 1
        tick(self, *args)

    pysyncobj.tcp_connection.TcpConnection.send = counting_send
    pysyncobj.syncobj.SyncObj._onTick = counting_tick
    return counts


def _node_main(conn: Any, address: str, peers: list[str], data_dir: str, password: str,
               count: bool) -> None:
    counts = _install_counters() if count else Counter()
    asyncio.run(_node_loop(conn, address, peers, data_dir, password, counts))


async def _node_loop(conn: Any, address: str, peers: list[str], data_dir: str,
                     password: str, counts: Counter[str]) -> None:
    from cluster import commands
    from cluster.raft_node import RaftNode, RaftSettings
    from cluster.state import KmsState
    from kmsd.audit.committer import AuditCommitter

    state = KmsState()
    node = RaftNode(RaftSettings(self_address=address, peer_addresses=tuple(peers),
                                 data_dir=data_dir, password=password,
                                 compaction_min_entries=10**7,
                                 compaction_min_seconds=10.0**6), state)
    node.start()
    loop = asyncio.get_running_loop()
    prepared: list[Any] = []
    try:
        while True:
            request = await loop.run_in_executor(None, conn.recv)
            what = request[0]
            if what == "stop":
                conn.send(None)
                return
            if what == "status":
                status = node.status()
                conn.send({"leader": node.is_leader, "has_leader": node.has_leader,
                           "applied": status.get("applied_index", 0),
                           "commit": status.get("commit_index", 0)})
            elif what == "cpu":
                conn.send(_cpu_seconds())
            elif what == "counts":
                conn.send(dict(counts))
            elif what == "prepare":
                params = request[1]
                items = [_record(address, i) for i in range(params["total_records"])]
                prepared = [params, items]
                conn.send(sum(len(item[0]) for item in items) / len(items))
            elif what == "run":
                params, items = prepared
                started = time.perf_counter()
                if params["mode"] == "seq":
                    result = await _run_seq(node, commands, items, params)
                else:
                    result = await _run_committer(node, AuditCommitter, items, params)
                result["wall_seconds"] = time.perf_counter() - started
                conn.send(result)
            else:
                conn.send({"error": f"unknown request {what}"})
    finally:
        node.stop()


async def _run_seq(node: Any, commands: Any, items: list[Any],
                   params: dict[str, Any]) -> dict[str, Any]:
    per_batch = params["records"]
    batches = [commands.AppendAudit(tuple(items[i:i + per_batch]))
               for i in range(0, len(items), per_batch)]
    started = time.perf_counter()
    for command in batches:
        await node.submit(command, timeout=10)
    return {"records": len(items), "batches": len(batches),
            "commit_ms": (time.perf_counter() - started) * 1000 / len(batches)}


async def _run_committer(node: Any, committer_class: Any, items: list[Any],
                         params: dict[str, Any]) -> dict[str, Any]:
    committer = committer_class(node, timeout=10)
    work = params["work_us"] / 1e6
    gap = params["gap_ms"] / 1000
    rng = random.Random(1)
    queue = list(reversed(items))

    async def client() -> None:
        while queue:
            item = queue.pop()
            if gap:
                # The response's way back, the client's turnaround, the next request's
                # way in: the client is away from the node meanwhile. Drawn at random,
                # as live clients are not in step with each other.
                await asyncio.sleep(rng.expovariate(1 / gap))
            if work:
                until = time.perf_counter() + work
                while time.perf_counter() < until:
                    pass
            await committer.commit(item)
            # A real request yields to the loop between its handler's steps.
            await asyncio.sleep(0)

    await asyncio.gather(*(client() for _ in range(params["concurrency"])))
    metrics = committer.metrics.as_dict()
    return {"records": metrics["records"], "batches": metrics["batches"],
            "commit_ms": metrics["mean_commit_ms"]}


# -- the driver ----------------------------------------------------------------------------

class Cluster:
    def __init__(self, port_base: int, password: str, count: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix="raft-batch-cost-")
        self.addresses = [f"127.0.0.1:{port_base + i}" for i in range(3)]
        context = multiprocessing.get_context("spawn")
        self.conns: list[Any] = []
        self.processes: list[Any] = []
        for i, address in enumerate(self.addresses):
            parent, child = context.Pipe()
            peers = [a for a in self.addresses if a != address]
            process = context.Process(target=_node_main, daemon=True, args=(
                child, address, peers, os.path.join(self.dir, f"node{i}"), password, count))
            process.start()
            self.conns.append(parent)
            self.processes.append(process)

    def ask(self, index: int, *request: Any) -> Any:
        self.conns[index].send(request)
        return self.conns[index].recv()

    def ask_all(self, *request: Any) -> list[Any]:
        for conn in self.conns:
            conn.send(request)
        return [conn.recv() for conn in self.conns]

    def wait_leader(self, seconds: float = 60.0) -> int:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            statuses = self.ask_all("status")
            leaders = [i for i, s in enumerate(statuses) if s["leader"]]
            if len(leaders) == 1 and all(s["has_leader"] for s in statuses):
                return leaders[0]
            time.sleep(0.2)
        raise SystemExit("no leader elected")

    def wait_applied(self, seconds: float = 30.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            statuses = self.ask_all("status")
            target = max(s["commit"] for s in statuses)
            if all(s["applied"] >= target for s in statuses):
                return
            time.sleep(0.002)
        raise SystemExit("followers did not catch up")

    def stop(self) -> None:
        for index, process in enumerate(self.processes):
            with contextlib.suppress(OSError, EOFError):
                self.ask(index, "stop")
            process.join(10)
            if process.is_alive():
                process.kill()  # this script's own child, by its handle
                process.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _serving(cluster: Cluster, leader: int, on: str) -> list[int]:
    followers = [i for i in range(3) if i != leader]
    return {"leader": [leader], "follower": followers[:1], "all": [0, 1, 2]}[on]


def measure(cluster: Cluster, leader: int, params: dict[str, Any], on: str) -> dict[str, Any]:
    serving = _serving(cluster, leader, on)
    share = dict(params, total_records=params["total_records"] // len(serving))
    mean_record = statistics.mean(cluster.ask(i, "prepare", share) for i in serving)
    cluster.wait_applied()
    before = cluster.ask_all("cpu")
    counts_before = cluster.ask_all("counts")
    for i in serving:  # all start together
        cluster.conns[i].send(("run",))
    results = {i: cluster.conns[i].recv() for i in serving}
    cluster.wait_applied()
    after = cluster.ask_all("cpu")
    counts_after = cluster.ask_all("counts")
    records = sum(r["records"] for r in results.values())
    batches = sum(r["batches"] for r in results.values())
    per_batch: dict[str, float] = {}
    for i, (old, new) in enumerate(zip(counts_before, counts_after, strict=True)):
        role = "leader" if i == leader else "follower"
        for kind, value in new.items():
            key = f"{role} {kind}"
            per_batch[key] = per_batch.get(key, 0) + (value - old.get(kind, 0)) / (
                batches * (1 if i == leader else 2))
    deltas = [(sum(a) - sum(b)) * 1e6 for a, b in zip(after, before, strict=True)]
    if params["mode"] == "committer":
        # The synthetic request work is the clients' own, not Raft's: spent by construction.
        for i, r in results.items():
            deltas[i] -= params["work_us"] * r["records"]
    system = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) * 1e6
    follower_us = [d / records for i, d in enumerate(deltas) if i != leader]
    commit_ms: dict[str, list[float]] = {}
    for i, r in results.items():
        commit_ms.setdefault("leader" if i == leader else "follower", []).append(r["commit_ms"])
    out = {"records": records, "batches": batches, "record_bytes": round(mean_record),
           "us_per_record": sum(deltas) / records,
           "system_us_per_record": system / records,
           "leader_us_per_record": deltas[leader] / records,
           "follower_us_per_record": sum(follower_us) / len(follower_us),
           "per_batch": per_batch,
           "mean_batch": records / batches,
           "records_per_s": records / max(r["wall_seconds"] for r in results.values())}
    out.update({f"{role}_commit_ms": statistics.mean(v) for role, v in commit_ms.items()})
    return out


def _summary(values: list[float]) -> str:
    return (f"median {statistics.median(values):7.1f}  min {min(values):7.1f}  "
            f"max {max(values):7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("seq", "committer"), default="seq")
    parser.add_argument("--records", default="10",
                        help="records per batch in seq mode; a comma list runs each")
    parser.add_argument("--total-records", type=int, default=10000)
    parser.add_argument("--on", choices=("leader", "follower", "all"), default="leader",
                        help="the node(s) that propose: each serving node runs its own "
                             "workload (seq stream or committer) on its share of the records")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="committer clients per serving node")
    parser.add_argument("--work-us", type=float, default=0.0)
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="committer mode: mean time (exponentially distributed) a client is "
                             "away between its answer and its next request")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port-base", type=int, default=23510)
    parser.add_argument("--label", default="")
    parser.add_argument("--count", action="store_true",
                        help="count messages and ticks per batch (adds CPU: not for timing)")
    parser.add_argument("--json", help="append one JSON line per configuration to this file")
    args = parser.parse_args()

    cluster = Cluster(args.port_base, password="bench-cluster-secret", count=args.count)
    try:
        leader = cluster.wait_leader()
        # Warm-up: connections, first allocations, the leader's no-op entry.
        measure(cluster, leader, {"mode": "seq", "records": 10, "total_records": 600}, "all")
        for per_batch in [int(x) for x in args.records.split(",")]:
            params = {"mode": args.mode, "records": per_batch,
                      "total_records": args.total_records, "concurrency": args.concurrency,
                      "work_us": args.work_us, "gap_ms": args.gap_ms}
            params["on"] = args.on
            runs = [measure(cluster, leader, params, args.on) for _ in range(args.repeats)]
            what = (f"seq {per_batch}/batch" if args.mode == "seq" else
                    f"committer c={args.concurrency} work={args.work_us:g}us "
                    f"gap={args.gap_ms:g}ms")
            what += f" on {args.on}"
            print(f"{args.label} {what}: {runs[0]['record_bytes']} B/record, "
                  f"{args.total_records} records x {args.repeats}, "
                  f"load {os.getloadavg()[0]:.1f}")
            print(f"  cluster CPU us/record   {_summary([r['us_per_record'] for r in runs])}")
            print(f"    of which kernel       "
                  f"{_summary([r['system_us_per_record'] for r in runs])}")
            print(f"  leader                  "
                  f"{_summary([r['leader_us_per_record'] for r in runs])}")
            print(f"  follower (mean of 2)    "
                  f"{_summary([r['follower_us_per_record'] for r in runs])}")
            print(f"  records/s               {_summary([r['records_per_s'] for r in runs])}")
            if args.mode == "committer":
                print(f"  mean batch              {_summary([r['mean_batch'] for r in runs])}")
            for role in ("leader", "follower"):
                if f"{role}_commit_ms" in runs[0]:
                    print(f"  commit ms, {role:8s}     "
                          f"{_summary([r[f'{role}_commit_ms'] for r in runs])}")
            if args.count:
                print("  per batch (follower: mean of 2):")
                for kind in sorted(runs[-1]["per_batch"]):
                    print(f"    {kind:45s} {runs[-1]['per_batch'][kind]:6.2f}")
            if args.json:
                with open(args.json, "a") as out:
                    out.write(json.dumps({"label": args.label, "params": params,
                                          "load": os.getloadavg(), "runs": runs}) + "\n")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
