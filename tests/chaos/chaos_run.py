"""A chaos run: start a 3-node cluster, drive a workload from several clients while
faults are injected for a bounded time, then check what survived and report.

    scripts/chaos                      # about 75 s of faults
    scripts/chaos --duration 600       # ten minutes
    scripts/chaos --no-netns           # force the fallback (kmsd dev on 127.0.0.1)

Network namespaces are used when `netns.probe()` says the kernel allows them (root,
iproute2); otherwise the run says so in its report and partitions by SIGSTOP (see
`faults`). Everything started is stopped by pid, and every namespace, veth and bridge
made is deleted, on success, failure or interrupt (SIGINT/SIGTERM). All loops are
bounded in time and count; the only traffic goes to 127.0.0.1 or to addresses in the
namespaces made here.

Output: a JSON report (stdout, or --report FILE) and a human summary on stderr. Exit
status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.chaos import checks, netns
from tests.chaos.faults import FaultInjector
from tests.chaos.nodes import continue_all, start_in_namespaces, stop_processes
from tests.chaos.secret_scan import scan
from tests.chaos.workload import Ledger, start_workers
from tests.integration.harness import Cluster, start_cluster


@dataclass
class Options:
    duration: float = 75.0      # seconds of faults
    warmup: float = 4.0         # workload before the first fault
    cooldown: float = 4.0       # workload after the last fault is healed
    workers: int = 6
    seed: int | None = None
    use_netns: bool = True
    data_dir: str | None = None
    keep: bool = False
    max_calls_per_worker: int = 200_000
    hold: tuple[float, float] = (3.0, 7.0)   # how long one fault lasts
    calm: tuple[float, float] = (1.5, 3.0)   # between a recovery and the next fault


class _Interrupted(BaseException):
    pass


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise _Interrupted(f"signal {signum}")


def run(options: Options) -> dict[str, Any]:
    """One chaos run; returns the report. A temporary data dir is removed afterwards,
    whatever happened, unless `options.keep`."""
    root = options.data_dir or tempfile.mkdtemp(prefix="kmsd-chaos-")
    os.makedirs(root, exist_ok=True)
    try:
        return _run(options, root)
    finally:
        if not options.keep and options.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)


def _run(options: Options, root: str) -> dict[str, Any]:
    seed = options.seed if options.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    run_tag = f"{seed:x}"
    report: dict[str, Any] = {"seed": seed, "options": {
        "duration_s": options.duration, "workers": options.workers,
        "hold_s": list(options.hold), "calm_s": list(options.calm)}}
    started = time.time()
    report["data_dir"] = root

    why_not = netns.probe() if options.use_netns else "disabled with --no-netns"
    report["network"] = {"mode": "netns" if why_not is None else "fallback",
                         "why": why_not or "network namespaces available: each node in its "
                         "own namespace, partitions cut veth links",
                         "stale_swept": netns.sweep_stale() if why_not is None else []}
    topology = netns.Topology(3) if why_not is None else None
    cluster: Cluster | None = None
    injector: FaultInjector | None = None
    stop = threading.Event()
    workers: list[Any] = []
    ledger = Ledger(run_tag)
    audit_json = b""
    report["checks"] = {}
    timings: dict[str, float] = {}
    report["timings"] = timings
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    if threading.current_thread() is threading.main_thread():
        for sig in previous:
            signal.signal(sig, _raise_interrupt)
    try:
        if topology is not None:
            topology.create()
            report["network"]["addresses"] = {
                "host": topology.host_ip,
                "nodes": [topology.client_ip(i) for i in (1, 2, 3)],
                "raft": [topology.raft_ip(i) for i in (1, 2, 3)]}
            cluster = start_in_namespaces(root, topology)
        else:
            cluster = start_cluster(root, 3, timeout=180)
        report["startup_s"] = round(time.time() - started, 2)

        injector = FaultInjector(cluster, topology, rng, hold=options.hold, calm=options.calm)
        workload_start = time.time()
        fault_end = workload_start + options.warmup + options.duration
        hard_deadline = time.monotonic() + options.warmup + options.duration + \
            options.cooldown + 300
        workers = start_workers(cluster, ledger, options.workers, stop, hard_deadline,
                                options.max_calls_per_worker, seed)
        time.sleep(options.warmup)
        injector.run(until=fault_end)
        injector.heal_everything()
        time.sleep(options.cooldown)
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
        workload_end = time.time()
        stuck = [w.name for w in workers if w.is_alive()]
        crashed = [f"{w.name}: {w.error!r}" for w in workers if w.error is not None]
        whole = injector.wait_whole(120)
        report["workload"] = {
            "seconds": round(workload_end - workload_start, 1), "calls": len(ledger.calls),
            "calls_by_op": _count_by(ledger.calls, "op"), "stuck_workers": stuck,
            "worker_errors": crashed, "whole_after": whole is not None}
        report["faults"] = [w.as_dict() for w in injector.windows]
        report["availability"] = checks.availability(ledger, injector.windows)
        report["longest_write_gap"] = checks.longest_write_gap(
            ledger, injector.windows, workload_start, workload_end)

        timings["workload_s"] = round(workload_end - workload_start, 1)
        mark = time.time()
        audit, chain = _checked("audit", lambda: checks.check_audit(cluster, ledger))
        audit_json = json.dumps(chain).encode()
        timings["audit_check_s"], mark = round(time.time() - mark, 1), time.time()
        writes, all_keys = _checked("writes", lambda: checks.check_writes(cluster, ledger,
                                                                          run_tag))
        timings["writes_check_s"], mark = round(time.time() - mark, 1), time.time()
        state = _checked("key_state", lambda: (checks.check_key_state(cluster, ledger), 0))[0]
        timings["key_state_check_s"], mark = round(time.time() - mark, 1), time.time()
        blobs = _checked("ciphertexts", lambda: (
            checks.check_ciphertexts(cluster, ledger, all_keys), 0))[0]
        timings["ciphertext_check_s"] = round(time.time() - mark, 1)
        report["checks"] = {r.name: r.as_dict() for r in (audit, writes, state, blobs)}
        if stuck or crashed:
            report["checks"]["workload"] = {"ok": False, "violations": stuck + crashed}
        if whole is None:
            report["checks"]["recovery"] = {"ok": False, "violations": [
                "the cluster was not whole (every node ready, a leader with quorum) "
                "120 s after the last fault was healed"]}
    finally:
        stop.set()
        if cluster is not None:
            continue_all(cluster)
            _stop_cluster(cluster)
        for sig, handler in previous.items():
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, handler)
        if topology is not None:
            left = topology.close()
            report["network"]["left_behind"] = left
    # The nodes are stopped: their logs and files are complete.
    report["checks"]["node_logs"] = node_log_findings(root)
    mark = time.time()
    scanned = scan([root], ledger.secrets, {"audit records (API)": audit_json})
    timings["secret_scan_s"] = round(time.time() - mark, 1)
    report["checks"]["secret_scan"] = scanned.as_dict()
    if report["network"].get("left_behind"):
        report["checks"]["cleanup"] = {"ok": False,
                                       "violations": report["network"]["left_behind"]}
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    report["runtime_s"] = round(time.time() - started, 1)
    return report


# pysyncobj's alarm when an append_entries reaches back past the applied index. It is
# logged before the journal is asked to truncate; kmsd's journal (cluster/journal.py)
# keeps committed entries and those of the current term, so applied entries are never
# dropped and the line alone proves nothing: a real loss shows as an audit divergence or
# a missing write. cluster/syncobj_guard.py drops held entries from a message first, so
# only an entry sent in parts still reaches pysyncobj's truncation. Counted, not failed.
RAFT_TRUNCATION = "truncating already-applied log entries"


def node_log_findings(root: str) -> dict[str, Any]:
    """Critical and error events in the node logs, counted by kind. A critical event
    (but pysyncobj's truncation alarm, see RAFT_TRUNCATION) or a request that escaped as
    an internal error (`request_failed`) fails the check; other errors are listed."""
    counts: dict[str, dict[str, int]] = {}
    violations = []
    for directory in sorted(os.listdir(root)):
        path = os.path.join(root, directory, "node.log")
        if not directory.startswith("node-") or not os.path.exists(path):
            continue
        with open(path, "rb") as handle:
            for line in handle:
                if b'"critical"' not in line and b'"error"' not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                level = event.get("level")
                if level not in ("critical", "error"):
                    continue
                text = str(event.get("event", ""))
                kind = RAFT_TRUNCATION if text.startswith(RAFT_TRUNCATION) else \
                    text if level == "critical" else f"{text} {event.get('exc_type', '')}"
                per_node = counts.setdefault(f"{level}: {kind.strip()}", {})
                per_node[directory] = per_node.get(directory, 0) + 1
    for kind, per_node in counts.items():
        if (kind.startswith("critical") and RAFT_TRUNCATION not in kind) or \
                "request_failed" in kind:
            violations.append(f"{kind}: {per_node}")
    return {"ok": not violations, "counts": counts, "violations": violations}


def _checked(name: str, check: Callable[[], tuple[checks.CheckResult, Any]]
             ) -> tuple[checks.CheckResult, Any]:
    """Run a check; one that cannot finish (a timeout, an error) is a failed check."""
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - reported, never hidden
        result = checks.CheckResult(name)
        result.fail(f"the check could not finish: {type(exc).__name__}: {exc}")
        return result, []


def _stop_cluster(cluster: Cluster) -> None:
    try:
        cluster.stop()
    finally:
        dev = getattr(cluster, "dev", None)
        stop_processes(list(dev.spawned) if dev is not None else cluster.extra_processes)


def _count_by(calls: list[Any], attr: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for call in calls:
        out[getattr(call, attr)] = out.get(getattr(call, attr), 0) + 1
    return dict(sorted(out.items()))


def summary(report: dict[str, Any]) -> str:
    lines = [f"kmsd chaos run: {'PASS' if report.get('ok') else 'FAIL'} "
             f"(seed {report['seed']}, {report.get('runtime_s')} s)"]
    network = report["network"]
    lines.append(f"network: {network['mode']} -- {network['why']}")
    lines.append(f"data dir: {report['data_dir']} (removed after the run unless kept)")
    workload = report.get("workload", {})
    lines.append(f"workload: {workload.get('calls')} calls in {workload.get('seconds')} s "
                 f"from {report['options']['workers']} clients")
    faults = report.get("faults", [])
    kinds: dict[str, int] = {}
    for fault in faults:
        kinds[fault["kind"]] = kinds.get(fault["kind"], 0) + 1
    lines.append(f"faults: {len(faults)} -- " + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    lines.append("availability (calls starting in each phase; success with SDK retries):")
    for phase, row in report.get("availability", {}).items():
        lines.append(f"  {phase:18} {row['calls']:6} calls  success {row['success_share']:.1%}"
                     f"  served {row['served_share']:.1%}  unavailable {row['unavailable']}")
    gap = report.get("longest_write_gap")
    if gap:
        lines.append(f"longest time without a successful write: {gap['seconds']} s "
                     f"(at {gap['from_s']}-{gap['to_s']} s; during {gap['faults_overlapping']})")
    for name, check in report.get("checks", {}).items():
        counts = check.get("counts", {k: v for k, v in check.items()
                                      if k not in ("ok", "violations", "hits")})
        lines.append(f"check {name}: {'ok' if check['ok'] else 'FAILED'} {json.dumps(counts)}")
        for violation in (check.get("violations") or check.get("hits") or [])[:10]:
            lines.append(f"    ! {violation}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=75.0,
                        help="seconds of fault injection (default 75)")
    parser.add_argument("--workers", type=int, default=6, help="client threads (default 6)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-netns", action="store_true",
                        help="do not use network namespaces (partition by SIGSTOP)")
    parser.add_argument("--data-dir", default=None, help="keep the cluster's files here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary data dir (its path is in the report)")
    parser.add_argument("--report", default=None, help="write the JSON report to this file")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 24 * 3600 or not 1 <= args.workers <= 64:
        parser.error("--duration must be in (0, 86400] and --workers in [1, 64]")
    report = run(Options(duration=args.duration, workers=args.workers, seed=args.seed,
                         use_netns=not args.no_netns, data_dir=args.data_dir, keep=args.keep))
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.report:
        with open(args.report, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    print(summary(report), file=sys.stderr)
    return 0 if report["ok"] else 1
