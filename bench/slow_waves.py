#!/usr/bin/env python3
"""When a loaded kmsd cluster's slow Decrypts happen, node by node: waves or scatter.

Starts `kmsd dev` (`--nodes`) on 127.0.0.1 and loads every node with wrk replaying a
signed Decrypt (`--concurrency` split over the nodes) for `--duration` seconds. Then it
reads each node's access lines (node.log: one JSON line per request, with the time it
was answered and `ms`, the handler's time), keeps the Decrypts answered during the load,
and puts each request in a `--bucket-ms` bucket by the time it started. A request slower
than `--slow-ms` is slow.

What it reports, besides wrk's figures and each node's own p50/p99:
- per node, the buckets holding at least one slow request;
- the buckets where two or more nodes had one, against the number expected if each node's
  slow buckets fell independently of the others' (from each node's share of buckets with
  a slow request). Far more than expected means the nodes slow down together: waves,
  from something they share.

    .venv/bin/python bench/slow_waves.py                       # 3 nodes, c=16, 12 s
    .venv/bin/python bench/slow_waves.py --concurrency 64 --slow-ms 60

Writes bench/results/slow-waves-<date>-c<concurrency>.json and a PNG beside it (or into
--out-dir). It reports, it never asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from typing import Any

import benchlib
import decrypt
from benchlib import Processes


def access_lines(log_path: str, since: float, until: float) -> list[tuple[float, float]]:
    """(start, ms) of every Decrypt the node answered between `since` and `until` (epoch
    seconds), start being the answer's time less the handler's."""
    found = []
    with open(log_path, errors="replace") as handle:
        for line in handle:
            if '"event": "request"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("operation") != "Decrypt" or "ms" not in event:
                continue
            answered = dt.datetime.fromisoformat(
                event["timestamp"].replace("Z", "+00:00")).timestamp()
            if since <= answered <= until:
                found.append((answered - event["ms"] / 1000.0, float(event["ms"])))
    return found


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


def analyse(per_node: dict[str, list[tuple[float, float]]], since: float, until: float,
            slow_ms: float, bucket_ms: float) -> dict[str, Any]:
    buckets = max(1, math.ceil((until - since) * 1000 / bucket_ms))
    nodes: dict[str, Any] = {}
    slow_buckets: dict[str, set[int]] = {}
    for name, requests in per_node.items():
        slow = Counter(min(buckets - 1, max(0, int((start - since) * 1000 // bucket_ms)))
                       for start, ms in requests if ms > slow_ms)
        slow_buckets[name] = set(slow)
        times = [ms for _, ms in requests]
        nodes[name] = {
            "requests": len(requests), "slow_requests": sum(slow.values()),
            "p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99),
            "buckets_with_slow": len(slow),
            "slow_per_bucket": [slow.get(i, 0) for i in range(buckets)],
        }
    shares = [len(found) / buckets for found in slow_buckets.values()]
    nodes_slow = Counter(i for found in slow_buckets.values() for i in found)
    shared = sorted(i for i, count in nodes_slow.items() if count >= 2)
    return {"buckets": buckets, "nodes": nodes,
            "buckets_slow_on_two_or_more_nodes": len(shared),
            "expected_if_independent": round(buckets * _two_or_more(shares), 2),
            "buckets_slow_on_every_node": sum(1 for c in nodes_slow.values()
                                              if c == len(per_node)),
            "seconds_slow_on_two_or_more_nodes": [round(i * bucket_ms / 1000, 2)
                                                  for i in shared]}


def _two_or_more(shares: list[float]) -> float:
    """The chance that two or more of independent events of these chances happen."""
    none = math.prod(1 - p for p in shares)
    one = sum(p * math.prod(1 - q for j, q in enumerate(shares) if j != i)
              for i, p in enumerate(shares))
    return max(0.0, 1 - none - one)


def run(args: argparse.Namespace) -> dict[str, Any]:
    processes = Processes()
    workdir = tempfile.mkdtemp(prefix="kmsd-slow-waves-")
    try:
        target = decrypt.start_kmsd(processes, workdir, args.nodes)
        benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", 8), 2)  # warm up
        time.sleep(0.5)  # the warm-up's last requests answered before the window opens
        loadavg = benchlib.loadavg()
        since = time.time()
        load = benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", args.concurrency),
                                args.duration)
        until = time.time()
        time.sleep(0.5)  # the last access lines are written at the end of a loop turn
        data_dir = os.path.join(workdir, f"kmsd{args.nodes}")
        per_node = {f"node-{i}": access_lines(os.path.join(data_dir, f"node-{i}", "node.log"),
                                              since, until)
                    for i in range(1, args.nodes + 1)}
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "machine": benchlib.machine_info(), "versions": benchlib.versions(),
        "date": benchlib.now_stamp()[1], "loadavg": loadavg,
        "settings": {"nodes": args.nodes, "concurrency": args.concurrency,
                     "duration_s": args.duration, "slow_ms": args.slow_ms,
                     "bucket_ms": args.bucket_ms},
        "load": {"rps": round(load["rps"], 1), "requests": load["requests"],
                 "errors": load["error_count"], "latency_ms": load["latency_ms"]},
        **analyse(per_node, since, until, args.slow_ms, args.bucket_ms),
    }


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["nodes"])
    bucket_s = result["settings"]["bucket_ms"] / 1000
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 1.6 + 1.3 * len(names)),
                             sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        counts = result["nodes"][name]["slow_per_bucket"]
        ax.bar([i * bucket_s for i in range(len(counts))], counts, width=bucket_s,
               align="edge", color="tab:red")
        ax.set_ylabel(name, rotation=0, ha="right", va="center")
    axes[-1, 0].set_xlabel("seconds into the load (requests by the time they started)")
    settings = result["settings"]
    fig.suptitle(f"Decrypts slower than {settings['slow_ms']:g} ms per "
                 f"{settings['bucket_ms']:g} ms, c={settings['concurrency']}: on two or more "
                 f"nodes in {result['buckets_slow_on_two_or_more_nodes']} buckets, "
                 f"{result['expected_if_independent']} if independent", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=12)
    parser.add_argument("--slow-ms", type=float, default=35.0)
    parser.add_argument("--bucket-ms", type=float, default=100.0)
    parser.add_argument("--out-dir", default=benchlib.RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    result = run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"slow-waves-{benchlib.now_stamp()[0]}"
                                      f"-c{args.concurrency}")
    with open(base + ".json", "w") as handle:
        json.dump(result, handle, indent=1)
    if not args.no_plot:
        plot(result, base + ".png")
    print(f"{result['load']['rps']} req/s, wrk p99 {result['load']['latency_ms']['p99']} ms")
    for name, node in result["nodes"].items():
        print(f"{name}: {node['requests']} Decrypts, handler p50 {node['p50_ms']} ms, "
              f"p99 {node['p99_ms']} ms, {node['slow_requests']} slow in "
              f"{node['buckets_with_slow']} of {result['buckets']} buckets")
    print(f"slow on two or more nodes at once: {result['buckets_slow_on_two_or_more_nodes']}"
          f" buckets (independent nodes would give {result['expected_if_independent']}),"
          f" at {result['seconds_slow_on_two_or_more_nodes']} s; on every node:"
          f" {result['buckets_slow_on_every_node']}")
    print(f"wrote {base}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
