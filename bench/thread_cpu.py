#!/usr/bin/env python3
"""CPU per request of every thread of a loaded kmsd: where a Decrypt's CPU goes.

Starts `kmsd dev` (`--nodes`, `--api-workers`) on 127.0.0.1, loads every node with wrk
replaying a signed Decrypt (bench/wrk/replay.lua, `--concurrency` split over the
nodes) for `--duration` seconds, and reads utime + stime of every thread of every node
process and its API workers from /proc/<pid>/task/<tid>/stat around the load. Unlike a
sampling profiler it counts CPU only, never a thread waiting to run. Figures are µs per
request of the whole run: a node that serves a third of the load shows a third of its
cost per request it serves. Thread names come from `py-spy dump` when py-spy is in the
virtualenv (Python's threads carry no name the kernel knows); without it the main thread
is named and the others go by /proc/<pid>/task/<tid>/comm.

    .venv/bin/python bench/thread_cpu.py --nodes 3 --concurrency 64
    .venv/bin/python bench/thread_cpu.py --nodes 1 --api-workers 2 --json out.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import benchlib
import decrypt
from benchlib import Processes

_PY_SPY_THREAD = re.compile(r'^Thread (\d+) \(\w+\): "([^"]*)"', re.MULTILINE)


def thread_cpu_seconds(pid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each live thread of `pid`, by thread id."""
    found: dict[int, tuple[float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        used = benchlib.stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        if used is not None:  # (else the thread ended meanwhile)
            found[int(tid)] = used
    return found


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by thread id (py-spy), or the kernel's names."""
    names: dict[int, str] = {}
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable))
    if py_spy is not None:
        done = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=30, check=False)
        names = {int(tid): name for tid, name in _PY_SPY_THREAD.findall(done.stdout)}
    for tid in thread_cpu_seconds(pid):
        if tid == pid:  # a process's first thread is Python's main thread
            names.setdefault(tid, "MainThread")
        elif tid not in names:
            try:
                with open(f"/proc/{pid}/task/{tid}/comm") as handle:
                    names[tid] = handle.read().strip()
            except OSError:
                names[tid] = "?"
    return names


def per_thread(before: dict[int, dict[int, tuple[float, float]]],
               after: dict[int, dict[int, tuple[float, float]]], requests: int,
               names: dict[int, dict[int, str]], roles: dict[int, str]) -> list[dict[str, Any]]:
    """One row per thread that ran during the load: µs of CPU per request."""
    rows = []
    for pid, threads in after.items():
        for tid, (user, system) in sorted(threads.items()):
            user0, system0 = before.get(pid, {}).get(tid, (0.0, 0.0))
            used_user, used_system = max(user - user0, 0.0), max(system - system0, 0.0)
            if used_user + used_system <= 0:
                continue
            rows.append({
                "process": roles[pid], "pid": pid, "tid": tid,
                "thread": names.get(pid, {}).get(tid, "?"),
                "us_per_request": (used_user + used_system) / requests * 1e6,
                "user_us_per_request": used_user / requests * 1e6,
                "system_us_per_request": used_system / requests * 1e6})
    return rows


def _is_leader(endpoint: str) -> bool:
    try:
        samples = benchlib.metric_samples(endpoint)
    except OSError:
        return False
    return any(s.name == "kmsd_raft_is_leader" and s.value == 1 for s in samples)


def _roles(node_pids: list[int], endpoints: list[str]) -> dict[int, str]:
    """What each process is: its node (the leader marked), or one of its API workers."""
    roles: dict[int, str] = {}
    for index, (pid, endpoint) in enumerate(zip(node_pids, endpoints, strict=True), start=1):
        node = f"node-{index}" + (" leader" if _is_leader(endpoint) else "")
        roles[pid] = node
        workers = 0
        for child in benchlib.descendants(pid):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as handle:
                    command = handle.read()
            except OSError:
                continue
            if b"api-worker" in command:
                workers += 1
                roles[child] = f"{node} worker {workers}"
    return roles


def run(args: argparse.Namespace) -> dict[str, Any]:
    decrypt.API_WORKERS[f"kmsd{args.nodes}"] = args.api_workers
    processes = Processes()
    workdir = tempfile.mkdtemp(prefix="kmsd-thread-cpu-")
    try:
        target = decrypt.start_kmsd(processes, workdir, args.nodes)
        benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", 8), 2)  # warm up
        roles = _roles(target.pids, target.endpoints)
        before = {pid: thread_cpu_seconds(pid) for pid in roles}
        load = benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", args.concurrency),
                                args.duration)
        after = {pid: thread_cpu_seconds(pid) for pid in roles}
        names = {pid: thread_names(pid) for pid in roles}
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    if load["requests"] == 0:
        raise RuntimeError("no request was answered")
    rows = per_thread(before, after, load["requests"], names, roles)
    return {
        "benchmark": "thread-cpu", "date": benchlib.now_stamp()[0],
        "machine": benchlib.machine_info(), "versions": benchlib.versions(),
        "settings": {"nodes": args.nodes, "api_workers": args.api_workers,
                     "concurrency": args.concurrency, "duration_s": args.duration},
        "load": {"rps": load["rps"], "requests": load["requests"],
                 "errors": load["error_count"], "latency_ms": load["latency_ms"]},
        "threads": rows,
        "total_us_per_request": sum(row["us_per_request"] for row in rows),
    }


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['load']['rps']:,.0f} req/s, {result['load']['errors']} errors; "
             f"CPU µs per request of the whole run:",
             f"{'process':<22} {'thread':<32} {'µs/req':>8} {'user':>8} {'system':>8}"]
    for row in result["threads"]:
        lines.append(f"{row['process']:<22} {row['thread'][:32]:<32} "
                     f"{row['us_per_request']:>8.0f} {row['user_us_per_request']:>8.0f} "
                     f"{row['system_us_per_request']:>8.0f}")
    lines.append(f"{'total':<55} {result['total_us_per_request']:>8.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, choices=(1, 3))
    parser.add_argument("--api-workers", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=int, default=8, help="seconds of load")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    benchlib.print_and_save(result, table(result), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
