#!/usr/bin/env python3
"""Profile kmsd's Decrypt path under load with py-spy, and turn the samples into µs/request.

Starts a 3-node `kmsd dev` cluster on 127.0.0.1, loads every node with wrk
replaying a pre-signed Decrypt (bench/wrk/replay.lua, --concurrency split over
the nodes), and meanwhile records with py-spy (100 Hz, idle threads excluded,
per thread): collapsed stacks of the leader, then of a follower, then a
flame graph SVG of the leader. Each node's CPU is read from /proc around the
whole load, so a category's share of a node's samples times that node's CPU
µs per request gives the category's cost per request.

    .venv/bin/python bench/profile.py                       # c=64, 10 s windows
    .venv/bin/python bench/profile.py --window 5 --concurrency 32

Writes bench/results/profile-decrypt.svg, profile-decrypt-{leader,follower}.folded
and profile-decrypt.json (or into --out-dir). py-spy must be in .venv
(bench/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from typing import Any

import benchlib
import decrypt
from benchlib import Processes

# Exclusive categories: a sample goes to the first category (in this order) that any of
# its frames matches; patterns are matched against "function (file:line)" frames.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("HSM: AES-GCM decrypt via python-pkcs11/SoftHSM2", ("decrypt_gcm (kmsd/hsm/partition.py",
                                                         "encrypt_gcm (kmsd/hsm/partition.py")),
    ("HSM: unwrap / random", ("kmsd/hsm/",)),
    ("SigV4 verification", ("kmsd/auth/sigv4.py", "kmsd/auth/credentials.py",
                            "Authenticator.authenticate", "signed_request (kmsd/api/protocol")),
    ("request validation (botocore model)", ("kmsd/api/validation.py",)),
    ("policy evaluation / authorization", ("kmsd/auth/authorizer.py", "kmsd/auth/policy",
                                           "authorize (kmsd/service/core.py")),
    ("key lookup", ("kmsd/service/key_lookup.py", "find_key")),
    ("audit: record build, canonical JSON, hashes",
     ("kmsd/audit/record.py", "kmsd/audit/chain.py", "KmsProtocol._record")),
    ("audit: segment files (on apply)", ("kmsd/audit/sink.py", "kmsd/audit/segments.py")),
    ("Raft: state machine apply (audit chain, re-check)", ("cluster/state.py",
                                                          "apply_command (cluster/raft_node")),
    ("Raft: command encode/decode (msgpack)", ("cluster/commands.py", "msgpack")),
    ("Raft: message encryption (cluster/raft_wire.py AES-GCM)", ("raft_wire.py", "fernet",
                                                                  "encryptor.py", "zlib")),
    ("Raft: pickle", ("pickle",)),
    ("Raft: journal", ("pysyncobj/journal.py", "cluster/journal.py")),
    ("Raft: pysyncobj tick, transport, poller", ("pysyncobj/",)),
    ("audit: group commit (event-loop side)", ("kmsd/audit/committer.py",
                                                "cluster/raft_node.py")),
    ("logging (structlog)", ("structlog", "kmsd/log_setup.py", "logging/")),
    ("metrics (prometheus_client)", ("prometheus_client", "kmsd/metrics.py")),
    ("uuid4 request/event ids", ("uuid.py",)),
    ("JSON decode/encode of the API body", ("json/",)),
    ("kmsd protocol / service (other)", ("kmsd/api/", "kmsd/service/", "kmsd/auth/",
                                         "kmsd/audit/", "kmsd/errors.py", "cluster/")),
    ("aiohttp HTTP server", ("aiohttp/",)),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
]


# Samples whose innermost frame is one of these are off-CPU waits that py-spy's idle
# detection still reports (poll/select/condition waits, fsync): counted apart, not as CPU.
WAITS: list[tuple[str, tuple[str, ...]]] = [
    ("fsync of audit segment files (I/O wait)", ("_sync (kmsd/audit/segments.py",
                                                 "_fsync_dir (kmsd/audit/segments.py")),
    ("poll/select/condition waits (idle)", ("select (selectors.py", "poll (pysyncobj/poller.py",
                                             "Condition.wait (threading.py",
                                             "Event.wait (threading.py", "wait (multiprocessing",
                                             "Queue.get (queue.py", "sleep")),
]


def _sink_wait_frame() -> str | None:
    """The audit sink thread blocks in a C-level queue get(), seen as its own line."""
    path = os.path.join(benchlib.REPO_DIR, "kmsd", "audit", "sink.py")
    try:
        with open(path) as handle:
            for number, line in enumerate(handle, 1):
                if "self._queue.get()" in line:
                    return f"SegmentSink._run (kmsd/audit/sink.py:{number})"
    except OSError:
        pass
    return None


_SINK_WAIT = _sink_wait_frame()


def _wait_kind(frames: list[str]) -> str | None:
    leaf = frames[-1]
    if _SINK_WAIT and leaf == _SINK_WAIT:
        return "poll/select/condition waits (idle)"
    for name, patterns in WAITS:
        if any(p in leaf for p in patterns):
            return name
    return None


def _frames(stack: str) -> list[str]:
    return stack.split(";")


def read_folded(path: str) -> list[tuple[list[str], int]]:
    samples = []
    with open(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count = line.rpartition(" ")
            samples.append((_frames(stack), int(count)))
    return samples


def split_waits(samples: list[tuple[list[str], int]]
                ) -> tuple[list[tuple[list[str], int]], Counter[str]]:
    cpu, waits = [], Counter()
    for frames, count in samples:
        kind = _wait_kind(frames)
        if kind is None:
            cpu.append((frames, count))
        else:
            waits[kind] += count
    return cpu, waits


def categorise(samples: list[tuple[list[str], int]]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for frames, count in samples:
        for name, patterns in CATEGORIES:
            if any(p in frame for frame in frames for p in patterns):
                counts[name] += count
                break
        else:
            counts["other"] += count
    return counts


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"; keeps the top-level package.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.split("/")
    return f"{name} ({'/'.join(parts[-2:])})"


def top_functions(samples: list[tuple[list[str], int]], limit: int = 25
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in samples:
        code = [f for f in frames if " (" in f]
        if code:
            self_counts[_short(code[-1])] += count
        for frame in {_short(f) for f in code}:
            inclusive[frame] += count
    return self_counts.most_common(limit), [
        (f, c) for f, c in inclusive.most_common(limit * 4)
        if ("kmsd/" in f or "cluster/" in f or "api/" in f or "auth/" in f or "audit/" in f
            or "hsm/" in f or "service/" in f or "pysyncobj" in f)][:limit]


def per_thread(samples: list[tuple[list[str], int]]) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for frames, count in samples:
        head = frames[0]
        kind = ("event loop and Raft ticks (MainThread)" if "MainThread" in head
                else head.split(":", 1)[-1].strip() or head)
        counts[kind] += count
    return dict(counts)


def _admin_status(cluster: benchlib.KmsdCluster, node: int) -> dict[str, Any]:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = cluster.info["admin_endpoints"][node] + "/v1/node/status"
    request = AWSRequest(method="GET", url=url, data=b"")
    creds = cluster.credentials
    SigV4Auth(Credentials(creds.access_key_id, creds.secret_access_key), "kms",
              creds.region).add_auth(request)
    http = urllib.request.Request(url, headers=dict(request.prepare().headers))
    with urllib.request.urlopen(http, timeout=5) as response:
        return json.loads(response.read())


def analyse(path: str, cpu_us_per_request: float | None) -> dict[str, Any]:
    """Shares of the on-CPU samples, times the node's measured CPU µs per request."""
    everything = read_folded(path)
    samples, waits = split_waits(everything)
    all_total = sum(c for _, c in everything) or 1
    total = sum(c for _, c in samples) or 1
    categories = categorise(samples)
    self_top, inclusive_top = top_functions(samples)

    def cost(count: int) -> float | None:
        return (count / total * cpu_us_per_request) if cpu_us_per_request else None

    return {
        "samples": all_total, "cpu_samples": total,
        "node_cpu_us_per_request": cpu_us_per_request,
        "waits": {k: {"samples": v, "share_of_all_samples": v / all_total}
                  for k, v in waits.items()},
        "threads": {k: {"samples": v, "share": v / total} for k, v in per_thread(samples).items()},
        "categories": [{"category": name, "samples": count, "share": count / total,
                        "us_per_request": cost(count)}
                       for name, count in categories.most_common()],
        "top_self": [{"function": f, "share": c / total, "us_per_request": cost(c)}
                     for f, c in self_top],
        "top_inclusive_kmsd": [{"function": f, "share": c / total, "us_per_request": cost(c)}
                               for f, c in inclusive_top],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--window", type=int, default=10, help="seconds per py-spy recording")
    parser.add_argument("--out-dir", default=benchlib.RESULTS_DIR)
    parser.add_argument("--analyse-only", action="store_true",
                        help="re-analyse the .folded files of the last run in --out-dir")
    args = parser.parse_args(argv)
    if args.analyse_only:
        out_path = os.path.join(args.out_dir, "profile-decrypt.json")
        with open(out_path) as handle:
            report = json.load(handle)
        for role in ("leader", "follower"):
            report["profiles"][role] = analyse(
                os.path.join(args.out_dir, f"profile-decrypt-{role}.folded"),
                report["node_cpu_us_per_request"][report[role]])
        with open(out_path, "w") as handle:
            json.dump(report, handle, indent=1)
        print_summary(report)
        return 0
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which(
        "py-spy")
    if py_spy is None or benchlib.wrk_path() is None:
        print("py-spy and wrk are needed: run bench/setup.sh", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    processes = Processes()
    workdir = tempfile.mkdtemp(prefix="kmsd-profile-")
    date, started_at = benchlib.now_stamp()
    try:
        target = decrypt.start_kmsd(processes, workdir, 3)
        cluster_pids = target.pids
        assert target.cluster is not None
        statuses = [_admin_status(target.cluster, n) for n in range(3)]
        leader = next(i for i, s in enumerate(statuses) if s["raft"]["role"] == "leader")
        follower = next(i for i in range(3) if i != leader)
        benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", 8), 2)  # warm-up
        duration = 3 * args.window + 6
        wrk_targets = target.wrk_targets(workdir, "Decrypt", args.concurrency)
        load = benchlib.loadavg()
        cpu_before = [benchlib.tree_cpu_seconds([pid]) for pid in cluster_pids]
        wrk = subprocess.Popen(
            [sys.executable, "-c",
             "import json,sys; sys.path.insert(0, sys.argv[1]); import benchlib; "
             "t=[benchlib.WrkTarget(**x) for x in json.loads(sys.argv[2])]; "
             "print(json.dumps(benchlib.run_wrk(t, int(sys.argv[3]))))",
             benchlib.BENCH_DIR, json.dumps([vars(t) for t in wrk_targets]), str(duration)],
            stdout=subprocess.PIPE, text=True, cwd=benchlib.REPO_DIR)
        time.sleep(3)
        recordings = [("leader", leader, "raw"), ("follower", follower, "raw"),
                      ("leader", leader, "flamegraph")]
        paths: dict[str, str] = {}
        for role, node, fmt in recordings:
            suffix = "svg" if fmt == "flamegraph" else f"{role}.folded"
            path = os.path.join(args.out_dir, "profile-decrypt." + suffix
                                if fmt == "flamegraph" else f"profile-decrypt-{suffix}")
            subprocess.run([py_spy, "record", "-o", path, "-f", fmt, "--threads", "--rate",
                            "100", "--duration", str(args.window), "--pid",
                            str(cluster_pids[node])],
                           check=True, capture_output=True, timeout=args.window + 60)
            paths[f"{role}-{fmt}"] = path
        out, _ = wrk.communicate(timeout=duration + 60)
        cpu_after = [benchlib.tree_cpu_seconds([pid]) for pid in cluster_pids]
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    per_node_requests = [w["requests"] for w in result["per_wrk"]]
    node_cpu = [after - before for before, after in zip(cpu_before, cpu_after, strict=True)]
    cpu_per_request = [cpu / req * 1e6 if req else None
                       for cpu, req in zip(node_cpu, per_node_requests, strict=True)]
    cluster_cpu_per_request = sum(node_cpu) / max(result["requests"], 1) * 1e6
    report = {
        "benchmark": "profile-decrypt", "date": date, "started_at": started_at,
        "machine": benchlib.machine_info(), "versions": benchlib.versions(),
        "loadavg_1m_before": load[0], "loadavg_end": benchlib.loadavg(),
        "settings": {"concurrency": args.concurrency, "window_s": args.window,
                     "sampler": "py-spy record --rate 100 --threads (idle excluded)",
                     "note": "py-spy itself takes CPU on this 2-core machine while it samples"},
        "load": {"rps": result["rps"], "requests": result["requests"],
                 "seconds": result["seconds"], "errors": result["error_count"],
                 "latency_ms": result["latency_ms"], "wrk_cores": result["wrk_cores"]},
        "leader": leader, "follower": follower,
        "node_cpu_seconds": node_cpu, "node_requests": per_node_requests,
        "node_cpu_us_per_request": cpu_per_request,
        "cluster_cpu_us_per_request": cluster_cpu_per_request,
        "profiles": {
            "leader": analyse(paths["leader-raw"], cpu_per_request[leader]),
            "follower": analyse(paths["follower-raw"], cpu_per_request[follower]),
        },
        "files": {k: os.path.relpath(v, benchlib.REPO_DIR) for k, v in paths.items()},
    }
    out_path = os.path.join(args.out_dir, "profile-decrypt.json")
    with open(out_path, "w") as handle:
        json.dump(report, handle, indent=1)
    print_summary(report)
    print(out_path)
    return 0


def print_summary(report: dict[str, Any]) -> None:
    for role in ("leader", "follower"):
        profile = report["profiles"][role]
        print(f"\n{role} (node {report[role]}): {profile['node_cpu_us_per_request']:.0f} "
              f"CPU us/request, {profile['cpu_samples']} on-CPU samples of "
              f"{profile['samples']}", file=sys.stderr)
        for row in profile["categories"]:
            print(f"  {row['share'] * 100:5.1f}%  {row['us_per_request'] or 0:6.0f} us  "
                  f"{row['category']}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
