#!/usr/bin/env python3
"""Decrypt throughput of two (or more) kmsd trees side by side: which one is faster.

Starts `kmsd dev` from each tree (`--tree NAME=PATH`, e.g. an older commit exported with
`git archive <rev> | tar -x -C /tmp/old`), all at once on 127.0.0.1, then measures them
in turn with wrk replaying a signed Decrypt: every round measures each tree once per
concurrency level, the trees' order rotating from round to round so that none always
runs first or right after another's load. A change too small for the run-to-run spread
of a shared machine shows in how many rounds it wins, not in one run.

    git archive HEAD~1 | tar -x -C /tmp/old
    .venv/bin/python bench/ab_decrypt.py --tree old=/tmp/old --tree new=. --nodes 3
    .venv/bin/python bench/ab_decrypt.py --tree old=/tmp/old --tree new=. --nodes 1 \\
        --api-workers 2 --levels 16,64 --rounds 6

Writes bench/results/ab-decrypt-<date>T<HHMM>-n<nodes>-w<workers>.json (or into --out-dir): per
round and level each tree's req/s, server CPU per request, p50 and p99; per level the
medians and, for the first two trees, the rounds each one won. It reports, it never
asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import benchlib
import decrypt
from benchlib import Processes


def parse_tree(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not os.path.isdir(os.path.join(path, "kmsd")):
        raise argparse.ArgumentTypeError(f"not NAME=PATH of a kmsd tree: {value!r}")
    return name, os.path.abspath(path)


def start_trees(processes: Processes, workdir: str, trees: dict[str, str], nodes: int
                ) -> dict[str, decrypt.Target]:
    started = {}
    for name, path in trees.items():
        tree_dir = os.path.join(workdir, name)
        os.makedirs(tree_dir)
        started[name] = decrypt.start_kmsd(processes, tree_dir, nodes, repo_dir=path)
    return started


def summarise(rounds: list[dict[str, Any]], names: list[str], levels: list[int]
              ) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for level in levels:
        rows = [r for r in rounds if r["concurrency"] == level]
        medians = {name: {key: benchlib.median([r["trees"][name][key] for r in rows])
                          for key in ("rps", "cpu_us_per_request", "p50_ms", "p99_ms")}
                   for name in names}
        entry: dict[str, Any] = {"median": medians,
                                 "errors": {n: sum(r["trees"][n]["errors"] for r in rows)
                                            for n in names}}
        if len(names) >= 2:
            a, b = names[0], names[1]
            entry["rounds"] = len(rows)
            entry[f"{b}_faster_rounds"] = sum(
                r["trees"][b]["rps"] > r["trees"][a]["rps"] for r in rows)
            entry[f"{b}_less_cpu_rounds"] = sum(
                (r["trees"][b]["cpu_us_per_request"] or 0)
                < (r["trees"][a]["cpu_us_per_request"] or 0) for r in rows)
        summary[f"c{level}"] = entry
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    trees = dict(args.tree)
    names = list(trees)
    levels = [int(x) for x in args.levels.split(",")]
    decrypt.API_WORKERS[f"kmsd{args.nodes}"] = args.api_workers
    processes = Processes()
    workdir = tempfile.mkdtemp(prefix="kmsd-ab-")
    date, started_at = benchlib.now_stamp()
    load = benchlib.loadavg()
    rounds: list[dict[str, Any]] = []
    try:
        targets = start_trees(processes, workdir, trees, args.nodes)
        for target in targets.values():  # warm-up: the first requests of a node cost more
            benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", 8), 1)
        for number in range(args.rounds):
            order = decrypt.rotated(names, number)
            for level in levels:
                row: dict[str, Any] = {"round": number, "concurrency": level, "order": order,
                                       "trees": {}}
                for name in order:
                    target = targets[name]
                    out = benchlib.measure(target.wrk_targets(workdir, "Decrypt", level),
                                           args.duration, target.pids)
                    row["trees"][name] = {
                        "rps": out["rps"], "cpu_us_per_request": out["server_cpu_us_per_request"],
                        "p50_ms": out["latency_ms"]["p50"], "p99_ms": out["latency_ms"]["p99"],
                        "errors": out["error_count"], "loadavg_1m_before": out["loadavg_1m_before"]}
                    print(f"round {number} c={level:<3} {name:10} {out['rps']:8.0f} req/s "
                          f"{out['server_cpu_us_per_request'] or 0:6.0f} us/req "
                          f"p99 {out['latency_ms']['p99']:7.2f} ms errors {out['error_count']}",
                          file=sys.stderr, flush=True)
                    time.sleep(args.pause)
                rounds.append(row)
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "ab-decrypt", "date": date, "started_at": started_at,
        "machine": benchlib.machine_info(), "versions": benchlib.versions(),
        "loadavg_1m_before": load[0], "loadavg_end": benchlib.loadavg(),
        "settings": {"trees": trees, "nodes": args.nodes, "api_workers": args.api_workers,
                     "levels": levels, "rounds": args.rounds, "duration_s": args.duration},
        "rounds": rounds, "summary": summarise(rounds, names, levels),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=parse_tree, action="append", required=True,
                        help="NAME=PATH of a kmsd source tree; give two or more")
    parser.add_argument("--nodes", type=int, choices=(1, 3), default=3)
    parser.add_argument("--api-workers", type=int, default=0)
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--pause", type=float, default=1.0)
    parser.add_argument("--out-dir", default=benchlib.RESULTS_DIR)
    args = parser.parse_args(argv)
    if len(args.tree) < 2 or len({name for name, _ in args.tree}) != len(args.tree):
        parser.error("give two or more --tree, each with its own name")
    if benchlib.wrk_path() is None:
        print("wrk is needed: run bench/setup.sh", file=sys.stderr)
        return 2
    result = run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    # 2026-12-07T20:31:05Z -> 2026-12-07T2031: one file per run, however many a day.
    stamp = result["started_at"][:16].replace(":", "")
    path = os.path.join(args.out_dir, f"ab-decrypt-{stamp}-n{args.nodes}-w{args.api_workers}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=1)
    for level, entry in result["summary"].items():
        line = ", ".join(f"{name} {m['rps']:.0f} req/s {m['cpu_us_per_request'] or 0:.0f} us "
                         f"p99 {m['p99_ms']:.2f} ms" for name, m in entry["median"].items())
        print(f"{level}: {line}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
