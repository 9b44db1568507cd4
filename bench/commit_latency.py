#!/usr/bin/env python3
"""How long a loaded kmsd's requests wait for their audit records, node by node.

Starts `kmsd dev` (`--nodes`) on 127.0.0.1 and, for each of `--concurrency`, loads every
node with wrk replaying a signed Decrypt (bench/wrk/replay.lua, the connections split
over the nodes) for `--duration` seconds. Around each load it reads every node's
/metrics and reports the difference:

- the audit batches the node committed (the leader: its own Raft entries, which also
  carry the followers' batches; a follower: the batches it forwarded to the leader),
  their mean size, and the mean time from a batch's hand-over to its commit
  (`kmsd_audit_commit_duration_seconds`: on a follower, until the task that forwarded
  the batch sees it applied), with the histogram bucket below which 90 % of them fell;
- the Raft entries committed meanwhile (the commit index), per second;
- how late the node's event loop ran its lag probe's timers (`kmsd_event_loop_lag_seconds`,
  one every 0.25 s): the wait every Raft message and request met on that node.

It reports, it never asserts. The machine is shared: compare figures of one run.

    .venv/bin/python bench/commit_latency.py                         # 3 nodes, c=16 and 64
    .venv/bin/python bench/commit_latency.py --concurrency 64 --json out.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from typing import Any

import benchlib
import decrypt
from benchlib import Processes

_BATCH = "kmsd_audit_batch_size"
_COMMIT = "kmsd_audit_commit_duration_seconds"
_LAG = "kmsd_event_loop_lag_seconds"


def read_metrics(endpoint: str) -> dict[str, Any]:
    """The figures this benchmark differences, from one node's /metrics."""
    found: dict[str, Any] = {"commit_buckets": {}, "lag_buckets": {}}
    for sample in benchlib.metric_samples(endpoint):
        if sample.name in (f"{_BATCH}_count", f"{_BATCH}_sum", f"{_COMMIT}_count",
                           f"{_COMMIT}_sum", f"{_LAG}_count", f"{_LAG}_sum",
                           "kmsd_raft_commit_index", "kmsd_raft_is_leader"):
            found[sample.name] = sample.value
        elif sample.name == f"{_COMMIT}_bucket":
            found["commit_buckets"][float(sample.labels["le"])] = sample.value
        elif sample.name == f"{_LAG}_bucket":
            found["lag_buckets"][float(sample.labels["le"])] = sample.value
    return found


def bucket_quantile(before: dict[float, float], after: dict[float, float],
                    quantile: float) -> float | None:
    """The smallest bucket bound at or below which `quantile` of the observations made
    between the two readings fell (None without observations)."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    for bound, cumulative in counts:
        if cumulative >= quantile * total:
            return bound
    return None


def node_rows(before: list[dict[str, Any]], after: list[dict[str, Any]],
              seconds: float) -> list[dict[str, Any]]:
    rows = []
    for index, (old, new) in enumerate(zip(before, after, strict=True), start=1):
        def delta(name: str, old: dict[str, Any] = old, new: dict[str, Any] = new) -> float:
            return new.get(name, 0.0) - old.get(name, 0.0)

        batches = delta(f"{_BATCH}_count")
        commits = delta(f"{_COMMIT}_count")
        lags = delta(f"{_LAG}_count")
        p90 = bucket_quantile(old["commit_buckets"], new["commit_buckets"], 0.9)
        lag_p90 = bucket_quantile(old["lag_buckets"], new["lag_buckets"], 0.9)
        rows.append({
            "node": f"node-{index}",
            "role": "leader" if new.get("kmsd_raft_is_leader") == 1 else "follower",
            "batches": int(batches),
            "records": int(delta(f"{_BATCH}_sum")),
            "records_per_batch": delta(f"{_BATCH}_sum") / batches if batches else None,
            "commit_mean_ms": delta(f"{_COMMIT}_sum") / commits * 1000 if commits else None,
            "commit_p90_at_most_ms": None if p90 is None else p90 * 1000,
            "entries_per_s": delta("kmsd_raft_commit_index") / seconds,
            "loop_lag_mean_ms": delta(f"{_LAG}_sum") / lags * 1000 if lags else None,
            "loop_lag_p90_at_most_ms": None if lag_p90 is None else lag_p90 * 1000,
        })
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = [int(level) for level in args.concurrency.split(",")]
    processes = Processes()
    workdir = tempfile.mkdtemp(prefix="kmsd-commit-latency-")
    results = []
    try:
        target = decrypt.start_kmsd(processes, workdir, args.nodes)
        benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", 8), 2)  # warm up
        for level in levels:
            before = [read_metrics(endpoint) for endpoint in target.endpoints]
            load = benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", level),
                                    args.duration)
            after = [read_metrics(endpoint) for endpoint in target.endpoints]
            results.append({
                "concurrency": level, "rps": load["rps"], "requests": load["requests"],
                "errors": load["error_count"], "latency_ms": load["latency_ms"],
                "nodes": node_rows(before, after, args.duration)})
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "commit-latency", "date": benchlib.now_stamp()[0],
        "machine": benchlib.machine_info(), "versions": benchlib.versions(),
        "settings": {"nodes": args.nodes, "duration_s": args.duration, "levels": levels},
        "levels": results,
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(result: dict[str, Any]) -> str:
    lines = []
    for level in result["levels"]:
        lines.append(f"c={level['concurrency']}: {level['rps']:,.0f} req/s, "
                     f"{level['errors']} errors")
        lines.append(f"  {'node':<8} {'role':<9} {'batches':>8} {'records/batch':>14} "
                     f"{'commit mean ms':>15} {'p90 <= ms':>10} {'entries/s':>10} "
                     f"{'loop lag mean ms':>17} {'p90 <= ms':>10}")
        for row in level["nodes"]:
            size = row["records_per_batch"]
            lines.append(f"  {row['node']:<8} {row['role']:<9} {row['batches']:>8} "
                         f"{'–' if size is None else f'{size:.1f}':>14} "
                         f"{_ms(row['commit_mean_ms']):>15} "
                         f"{_ms(row['commit_p90_at_most_ms']):>10} "
                         f"{row['entries_per_s']:>10.0f} "
                         f"{_ms(row['loop_lag_mean_ms']):>17} "
                         f"{_ms(row['loop_lag_p90_at_most_ms']):>10}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 3))
    parser.add_argument("--concurrency", default="16,64", help="levels, comma-separated")
    parser.add_argument("--duration", type=int, default=8, help="seconds of load per level")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    benchlib.print_and_save(result, table(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
