#!/usr/bin/env python3
"""Decrypt throughput and latency: kmsd side by side with its peers and its ceilings.

Starts everything it measures itself, on 127.0.0.1, and measures all of it in
the same run with the same load generator (wrk replaying pre-signed SigV4
requests through bench/wrk/replay.lua, re-signed before every run) and the
same request mix:

    kmsd3    a kmsd 3-node cluster (`kmsd dev --nodes 3`: SigV4, validation, policy,
             SoftHSM2 AES-GCM, fail-closed audit group commit through Raft); the load
             is spread over all nodes, one wrk per node with a third of the connections
    kmsd1    a single kmsd node (`kmsd dev --nodes 1`)
    moto     moto's server (moto_server) doing the same Decrypt
    null     a bare aiohttp handler that reads the body and returns fixed JSON
    minimal  bench/minimal_server.py: SigV4 + JSON + SoftHSM2 AES-GCM inline, one process
    raw_hsm  bench/raw_hsm.py: AES-GCM decrypts/s through python-pkcs11, no HTTP

Decrypt is swept over the concurrency levels (connections in flight); Encrypt and
GenerateDataKey are measured at one level. Repetitions are interleaved (every
target at every level, then again), each figure is the median over repetitions,
and every ratio is computed within one repetition, then the median is taken.

    .venv/bin/python bench/decrypt.py                 # 3 runs x 6 s, all targets
    .venv/bin/python bench/decrypt.py --quick         # 1 run x 2 s (smoke)
    .venv/bin/python bench/decrypt.py --quick --targets null,minimal --duration 1

Writes bench/results/decrypt-<date>-<host>.json, decrypt-<date>-<host>.png and
decrypt-<date>.md (or into --out-dir).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import benchlib
from benchlib import Credentials, Processes, WrkTarget

ALL_TARGETS = ("kmsd3", "kmsd1", "moto", "null", "minimal", "raw_hsm")
HTTP_TARGETS = ("kmsd3", "kmsd1", "moto", "null", "minimal")
LABELS = {
    "kmsd3": "kmsd, 3-node cluster (audit fail-closed)",
    "kmsd1": "kmsd, single node",
    "moto": "moto_server",
    "null": "bare aiohttp (ceiling)",
    "minimal": "minimal SigV4+SoftHSM server",
    "raw_hsm": "raw SoftHSM2 AES-GCM (no HTTP)",
}
DEFAULT_LEVELS = (1, 8, 16, 32, 64, 128)
OPS = ("Encrypt", "GenerateDataKey")
BENCH_ACCESS_KEY = "AKIABENCHMINIMAL0001"


@dataclass
class Target:
    """A running server under test: where to send load, whose CPU to count, what to send."""

    name: str
    endpoints: list[str]
    pids: list[int]
    credentials: Credentials
    params: dict[str, Callable[[], dict[str, Any]]]
    info: dict[str, Any] = field(default_factory=dict)
    cluster: benchlib.KmsdCluster | None = None

    def request_files(self, workdir: str, op: str) -> list[str]:
        """Freshly signed requests, one file per endpoint (SigV4 signs the Host header)."""
        files = []
        for index, endpoint in enumerate(self.endpoints):
            path = os.path.join(workdir, f"{self.name}-{op}-{index}.req")
            benchlib.write_requests(path, [benchlib.raw_request(
                endpoint, op, self.params[op](), self.credentials)])
            files.append(path)
        return files

    def wrk_targets(self, workdir: str, op: str, connections: int) -> list[WrkTarget]:
        files = self.request_files(workdir, op)
        split = benchlib.split_connections(connections, len(self.endpoints))
        return [WrkTarget(endpoint, path, count)
                for endpoint, path, count in zip(self.endpoints, files, split, strict=True)
                if count > 0]


def _expect_ok(endpoint: str, op: str, params: dict[str, Any], creds: Credentials,
               what: str) -> dict[str, Any]:
    status, body = benchlib.call(endpoint, op, params, creds)
    if status != 200:
        raise RuntimeError(f"{what}: {op} on {endpoint} answered {status} {body}")
    return body


def _wait_ok(endpoint: str, op: str, params: dict[str, Any], creds: Credentials,
             timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = benchlib.call(endpoint, op, params, creds)
        if status == 200:
            return body
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {op} on {endpoint} still answers {status} {body}")
        time.sleep(0.2)


def _kms_params(key_id: str, blob: str) -> dict[str, Callable[[], dict[str, Any]]]:
    return {
        "Decrypt": lambda: {"CiphertextBlob": blob},
        "Encrypt": lambda: {"KeyId": key_id, "Plaintext": benchlib.b64(os.urandom(32))},
        "GenerateDataKey": lambda: {"KeyId": key_id, "KeySpec": "AES_256"},
    }


# `--api-workers`: API worker processes per kmsd node besides its primary, by target.
API_WORKERS: dict[str, int] = {"kmsd1": 0, "kmsd3": 0}


def parse_api_workers(value: str) -> dict[str, int]:
    """"N" for both kmsd targets, or "kmsd1=N,kmsd3=M"."""
    if value.isdigit():
        return {"kmsd1": int(value), "kmsd3": int(value)}
    out = {"kmsd1": 0, "kmsd3": 0}
    for part in filter(None, value.split(",")):
        name, _, count = part.partition("=")
        if name not in out or not count.isdigit():
            raise argparse.ArgumentTypeError(f"not N or kmsd1=N,kmsd3=M: {value!r}")
        out[name] = int(count)
    return out


def start_kmsd(processes: Processes, workdir: str, nodes: int,
               repo_dir: str | None = None) -> Target:
    name = f"kmsd{nodes}"
    cluster = benchlib.start_kmsd(processes, os.path.join(workdir, name), nodes,
                                  api_workers=API_WORKERS[name], repo_dir=repo_dir)
    creds = cluster.credentials
    first = cluster.endpoints[0]
    key_id = _expect_ok(first, "CreateKey", {"Description": "bench"}, creds,
                        "kmsd")["KeyMetadata"]["KeyId"]
    blob = _expect_ok(first, "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"},
                      creds, "kmsd")["CiphertextBlob"]
    for endpoint in cluster.endpoints:  # the key has replicated everywhere
        _wait_ok(endpoint, "Decrypt", {"CiphertextBlob": blob}, creds, 30, "kmsd")
    return Target(f"kmsd{nodes}", cluster.endpoints, cluster.pids, creds,
                  _kms_params(key_id, blob),
                  {"nodes": nodes, "dev_pid": cluster.process.pid, "key_id": key_id,
                   "api_workers_per_node": API_WORKERS[name]},
                  cluster)


def start_moto(processes: Processes, workdir: str) -> Target:
    port = benchlib.free_port()
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    process = processes.start([moto, "-H", benchlib.LOOPBACK, "-p", str(port)],
                              os.path.join(workdir, "moto.log"))
    benchlib.wait_port(port, 60)
    endpoint = f"http://{benchlib.LOOPBACK}:{port}"
    creds = Credentials("AKIAMOTOBENCH0000001", "moto-does-not-check-this")
    key_id = _wait_ok(endpoint, "CreateKey", {"Description": "bench"}, creds, 30,
                      "moto")["KeyMetadata"]["KeyId"]
    blob = _expect_ok(endpoint, "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"},
                      creds, "moto")["CiphertextBlob"]
    _expect_ok(endpoint, "Decrypt", {"CiphertextBlob": blob}, creds, "moto")
    return Target("moto", [endpoint], [process.pid], creds, _kms_params(key_id, blob),
                  {"port": port})


def start_null(processes: Processes, workdir: str) -> Target:
    port = benchlib.free_port()
    process = processes.start([sys.executable, os.path.join(benchlib.BENCH_DIR, "null_server.py"),
                               "--port", str(port)], os.path.join(workdir, "null.log"))
    benchlib.wait_port(port, 30)
    endpoint = f"http://{benchlib.LOOPBACK}:{port}"
    creds = Credentials("AKIANULLBENCH0000001", "unused")
    # The same request a kmsd Decrypt of a 32-byte data key is: an 82-byte blob.
    blob = benchlib.b64(os.urandom(82))
    _expect_ok(endpoint, "Decrypt", {"CiphertextBlob": blob}, creds, "null")
    return Target("null", [endpoint], [process.pid], creds, _kms_params("unused", blob),
                  {"port": port})


def start_minimal(processes: Processes, workdir: str) -> Target:
    token = benchlib.make_token(os.path.join(workdir, "minimal-token"), "bench-minimal")
    port = benchlib.free_port()
    creds = Credentials(BENCH_ACCESS_KEY, benchlib.random_text(40))
    process = processes.start(
        [sys.executable, os.path.join(benchlib.BENCH_DIR, "minimal_server.py"),
         "--port", str(port), "--token-label", token.label, "--module",
         benchlib.softhsm_module(), "--access-key-id", creds.access_key_id],
        os.path.join(workdir, "minimal.log"),
        env={**token.env, "BENCH_PIN": token.pin, "BENCH_SECRET": creds.secret_access_key},
        stdout_pipe=True)
    assert process.stdout is not None
    announced = json.loads(process.stdout.readline() or b"{}")
    if "key_id" not in announced:
        raise RuntimeError("the minimal server did not start: see minimal.log")
    benchlib.wait_port(port, 30)
    endpoint = f"http://{benchlib.LOOPBACK}:{port}"
    key_id = announced["key_id"]
    made = _expect_ok(endpoint, "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"},
                      creds, "minimal")
    back = _expect_ok(endpoint, "Decrypt", {"CiphertextBlob": made["CiphertextBlob"]}, creds,
                      "minimal")
    if back["Plaintext"] != made["Plaintext"]:
        raise RuntimeError("the minimal server's Decrypt does not round-trip")
    return Target("minimal", [endpoint], [process.pid], creds,
                  _kms_params(key_id, made["CiphertextBlob"]), {"port": port})


STARTERS: dict[str, Callable[[Processes, str], Target]] = {
    "kmsd3": lambda p, w: start_kmsd(p, w, 3),
    "kmsd1": lambda p, w: start_kmsd(p, w, 1),
    "moto": start_moto,
    "null": start_null,
    "minimal": start_minimal,
}


_RAW_TOKENS: dict[str, benchlib.Token] = {}


def run_raw_hsm(workdir: str, duration: float) -> dict[str, Any]:
    token_dir = os.path.join(workdir, "raw-token")
    token = _RAW_TOKENS.get(token_dir)
    if token is None:
        token = _RAW_TOKENS[token_dir] = benchlib.make_token(token_dir, "bench-raw")
    load = benchlib.loadavg()
    done = subprocess.run(
        [sys.executable, os.path.join(benchlib.BENCH_DIR, "raw_hsm.py"), "--module",
         benchlib.softhsm_module(), "--token-label", token.label, "--duration", str(duration)],
        capture_output=True, text=True, timeout=duration * 3 + 60, check=False,
        env={**os.environ, **token.env, "BENCH_PIN": token.pin})
    if done.returncode != 0:
        raise RuntimeError(f"raw_hsm.py failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["loadavg_1m_before"] = load[0]
    return result


# -- the run --------------------------------------------------------------------------------

def figure(result: dict[str, Any]) -> dict[str, Any]:
    latency = result["latency_ms"]
    return {"rps": result["rps"], "p50_ms": latency["p50"], "p90_ms": latency["p90"],
            "p99_ms": latency["p99"], "max_ms": latency["max"],
            # Little's law for a closed loop: the mean time in the system, free of wrk's
            # coordinated-omission correction (which the percentiles above include).
            "mean_ms_littles_law": (result["concurrency"] / result["rps"] * 1000
                                    if result["rps"] else None),
            "errors": result["error_count"],
            "requests": result["requests"],
            "server_cpu_us_per_request": result["server_cpu_us_per_request"],
            "server_cores": result["server_cores"], "wrk_cores": result["wrk_cores"],
            "wrk_cpu_share": (result["wrk_cpu_seconds"]
                              / (result["wrk_cpu_seconds"] + result["server_cpu_seconds"])
                              if result["wrk_cpu_seconds"] + result["server_cpu_seconds"]
                              else None),
            "loadavg_1m_before": result["loadavg_1m_before"]}


def median_figures(figures: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in figures[0] if k != "errors" and k != "requests"]
    merged: dict[str, Any] = {k: benchlib.median([f[k] for f in figures]) for k in keys}
    merged["errors"] = sum(f["errors"] for f in figures)
    merged["requests"] = sum(f["requests"] for f in figures)
    merged["runs"] = len(figures)
    return merged


RATIOS = (
    # (name, numerator target, denominator target, metric)
    ("kmsd3/moto", "kmsd3", "moto", "rps"),
    ("kmsd3/ceiling", "kmsd3", "null", "rps"),
    ("kmsd3/minimal", "kmsd3", "minimal", "rps"),
    ("kmsd1/moto", "kmsd1", "moto", "rps"),
    ("kmsd1/ceiling", "kmsd1", "null", "rps"),
    ("kmsd1/minimal", "kmsd1", "minimal", "rps"),
    ("kmsd3/kmsd1", "kmsd3", "kmsd1", "rps"),
    ("minimal/ceiling", "minimal", "null", "rps"),
    ("p99 kmsd3/minimal", "kmsd3", "minimal", "p99_ms"),
    ("p99 kmsd1/minimal", "kmsd1", "minimal", "p99_ms"),
)


def compute_ratios(runs: list[dict[str, Any]], levels: list[int], op_level: int,
                   ops: list[str]) -> dict[str, Any]:
    """Ratios within each repetition, then the median over repetitions."""
    by_key = {(r["rep"], r["target"], r["op"], r["concurrency"]): r["figure"] for r in runs}
    reps = sorted({r["rep"] for r in runs})
    ratios: dict[str, Any] = {}
    for name, top, bottom, metric in RATIOS:
        per_level: dict[str, Any] = {}
        for level in levels:
            values = []
            for rep in reps:
                a = by_key.get((rep, top, "Decrypt", level))
                b = by_key.get((rep, bottom, "Decrypt", level))
                if a and b and b[metric]:
                    values.append(a[metric] / b[metric])
            if values:
                per_level[str(level)] = {"median": benchlib.median(values), "per_run": values}
        if per_level:
            ratios[name] = per_level
    for target in ("kmsd3", "kmsd1", "minimal", "moto"):
        for op in ops:
            values = []
            for rep in reps:
                a = by_key.get((rep, target, op, op_level))
                b = by_key.get((rep, target, "Decrypt", op_level))
                if a and b and b["rps"]:
                    values.append(a["rps"] / b["rps"])
            if values:
                ratios[f"{target} {op}/Decrypt"] = {
                    str(op_level): {"median": benchlib.median(values), "per_run": values}}
    return ratios


def _ratio(ratios: dict[str, Any], name: str, level: int) -> float | None:
    entry = ratios.get(name, {}).get(str(level))
    return entry["median"] if entry else None


def nearest(levels: list[int], want: int) -> int:
    return min(levels, key=lambda level: (abs(level - want), level))


def check_targets(ratios: dict[str, Any], summary: dict[str, Any], levels: list[int],
                  op_level: int) -> list[dict[str, Any]]:
    """The issue's targets (ratios measured in the same run), each with its verdict."""
    at64, at16 = nearest(levels, 64), nearest(levels, 16)
    checks = [
        ("Decrypt kmsd3 >= 15x moto", _ratio(ratios, "kmsd3/moto", at64), 15.0, at64, ">="),
        ("Decrypt kmsd3 >= 1.0x minimal", _ratio(ratios, "kmsd3/minimal", at64), 1.0, at64,
         ">="),
        ("Decrypt kmsd1 >= 0.8x minimal", _ratio(ratios, "kmsd1/minimal", at64), 0.8, at64,
         ">="),
        ("p99 kmsd3 <= 2x minimal's p99", _ratio(ratios, "p99 kmsd3/minimal", at16), 2.0, at16,
         "<="),
        ("GenerateDataKey >= 0.8x Decrypt (kmsd3)",
         _ratio(ratios, "kmsd3 GenerateDataKey/Decrypt", op_level), 0.8, op_level, ">="),
        ("Encrypt >= 0.9x Decrypt (kmsd3)", _ratio(ratios, "kmsd3 Encrypt/Decrypt", op_level),
         0.9, op_level, ">="),
    ]
    out = []
    for name, value, bound, level, sense in checks:
        met = None if value is None else (value >= bound if sense == ">=" else value <= bound)
        out.append({"target": name, "concurrency": level, "value": value, "bound": bound,
                    "met": met})
    errors = summary.get("kmsd3", {}).get("Decrypt", {}).get(str(at16), {}).get("errors")
    out.append({"target": "no errors (kmsd3, Decrypt)", "concurrency": at16,
                "value": errors, "bound": 0, "met": None if errors is None else errors == 0})
    return out


def rotated(items: list[Any], rep: int) -> list[Any]:
    """The servers in the order run `rep` measures them: each run starts one further along.
    The shared machine drifts within a run; a fixed order would give one server the same
    place in that drift every time, and a within-run ratio the same bias."""
    if not items:
        return items
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def run(args: argparse.Namespace) -> dict[str, Any]:
    targets_wanted = [t for t in args.targets.split(",") if t]
    unknown = set(targets_wanted) - set(ALL_TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    levels = [int(v) for v in args.levels.split(",")]
    ops = [op for op in args.ops.split(",") if op]
    op_level = args.op_level if args.op_level in levels else nearest(levels, args.op_level)
    date, started_at = benchlib.now_stamp()
    processes = Processes()
    workdir = tempfile.mkdtemp(prefix="kmsd-bench-")
    load_start = benchlib.loadavg()
    runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    started: dict[str, Target] = {}
    idle_cores: dict[str, float] = {}
    try:
        for name in targets_wanted:
            if name == "raw_hsm":
                continue
            print(f"starting {name} ...", file=sys.stderr, flush=True)
            started[name] = STARTERS[name](processes, workdir)
        for target in started.values():  # warm-up, not recorded
            benchlib.run_wrk(target.wrk_targets(workdir, "Decrypt", 8), args.warmup)
        for name, target in started.items():  # what the server burns with no load at all
            before = benchlib.tree_cpu_seconds(target.pids)
            time.sleep(args.idle)
            idle_cores[name] = (benchlib.tree_cpu_seconds(target.pids) - before) / args.idle
        for rep in range(args.runs):
            order = rotated(list(started.items()), rep)
            for level in levels:
                for name, target in order:
                    result = benchlib.measure(target.wrk_targets(workdir, "Decrypt", level),
                                              args.duration, target.pids)
                    runs.append({"rep": rep, "target": name, "op": "Decrypt",
                                 "concurrency": level, "figure": figure(result), "raw": result})
                    print(f"run {rep} Decrypt c={level:<3} {name:8} "
                          f"{result['rps']:9.1f} req/s p99 {result['latency_ms']['p99']:8.2f} ms"
                          f" errors {result['error_count']}", file=sys.stderr, flush=True)
                    time.sleep(args.pause)
            for op in ops:
                for name, target in order:
                    if name == "null":
                        continue
                    result = benchlib.measure(target.wrk_targets(workdir, op, op_level),
                                              args.duration, target.pids)
                    runs.append({"rep": rep, "target": name, "op": op, "concurrency": op_level,
                                 "figure": figure(result), "raw": result})
                    print(f"run {rep} {op} c={op_level} {name:8} {result['rps']:9.1f} req/s",
                          file=sys.stderr, flush=True)
                    time.sleep(args.pause)
            if "raw_hsm" in targets_wanted:
                raw = run_raw_hsm(workdir, args.duration)
                raw["rep"] = rep
                raw_runs.append(raw)
                print(f"run {rep} raw_hsm {raw['decrypt']['ops_per_s']:9.1f} decrypts/s",
                      file=sys.stderr, flush=True)
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    summary: dict[str, Any] = {}
    for name in started:
        for op in ["Decrypt", *ops]:
            for level in levels:
                figures = [r["figure"] for r in runs
                           if r["target"] == name and r["op"] == op and r["concurrency"] == level]
                if figures:
                    summary.setdefault(name, {}).setdefault(op, {})[str(level)] = \
                        median_figures(figures)
    raw_summary = None
    if raw_runs:
        raw_summary = {op: {k: benchlib.median([r[op][k] for r in raw_runs])
                            for k in ("ops_per_s", "cpu_us_per_op", "cores")}
                       for op in ("decrypt", "encrypt")}
        for op in ("decrypt", "encrypt"):
            raw_summary[op]["latency_us"] = {
                k: benchlib.median([r[op]["latency_us"][k] for r in raw_runs])
                for k in ("p50", "p90", "p99", "max")}
    ratios = compute_ratios(runs, levels, op_level, ops)
    _, finished_at = benchlib.now_stamp()
    return {
        "benchmark": "decrypt",
        "date": date, "started_at": started_at, "finished_at": finished_at,
        "machine": benchlib.machine_info(), "versions": benchlib.versions(),
        "loadavg": {"start": load_start, "end": benchlib.loadavg()},
        "settings": {"runs": args.runs, "duration_s": args.duration, "levels": levels,
                     "ops": ops, "op_level": op_level, "warmup_s": args.warmup,
                     "quick": args.quick, "targets": targets_wanted,
                     "api_workers_per_kmsd_node": args.api_workers,
                     "load_generator": "wrk -t1 per endpoint, Lua replay of pre-signed requests"
                                       " (bench/wrk/replay.lua), re-signed per run",
                     "request": "Decrypt of a 32-byte AES_256 data key, no encryption context;"
                                " Encrypt of 32 bytes; GenerateDataKey AES_256"},
        "targets": {name: {"label": LABELS[name], **t.info}
                    for name, t in started.items()}
                   | ({"raw_hsm": {"label": LABELS["raw_hsm"]}} if raw_runs else {}),
        "idle_server_cores": idle_cores,
        "summary": summary,
        "raw_hsm": {"summary": raw_summary, "runs": raw_runs} if raw_runs else None,
        "ratios": ratios,
        "issue_targets": check_targets(ratios, summary, levels, op_level),
        "runs": runs,
    }


# -- output ---------------------------------------------------------------------------------

def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    machine, versions = results["machine"], results["versions"]
    settings = results["settings"]
    lines = [
        f"# Decrypt benchmark, {results['date']}",
        "",
        f"Machine: {machine['host']}, {machine['cores']} cores ({machine['model_name']}), "
        f"{(machine['memory_bytes'] or 0) / 2**30:.1f} GiB; load average at start "
        f"{results['loadavg']['start'][0]:.2f}, at end {results['loadavg']['end'][0]:.2f} "
        "(the machine is shared: compare within this run only).",
        f"Versions: Python {versions['python']}, kmsd {versions['kmsd']}, pysyncobj "
        f"{versions['pysyncobj']}, python-pkcs11 {versions['python-pkcs11']}, aiohttp "
        f"{versions['aiohttp']}, SoftHSM {versions['softhsm']}, moto {versions['moto']}, "
        f"{versions['wrk']}.",
        f"Method: {settings['load_generator']}; {settings['request']}. Each figure is the "
        f"median of {settings['runs']} run(s) of {settings['duration_s']:g} s; ratios are taken "
        "within one run, then the median; each run measures the servers in an order one "
        "further along than the run before. c = connections in flight (for kmsd3 split over "
        "the three nodes). Server CPU counts every process of the server (all nodes for "
        "kmsd3); wrk cores is the load generator's CPU. API worker processes per kmsd node "
        "(besides its primary): " + ", ".join(
            f"{name} {count}" for name, count in settings.get(
                "api_workers_per_kmsd_node", {}).items()) + ".",
        "",
        "Idle CPU (cores, no load): " + ", ".join(
            f"{LABELS[k]} {v:.3f}" for k, v in results.get("idle_server_cores", {}).items())
        + ".",
        "",
        "## Decrypt",
        "",
        "| server | c | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | server CPU µs/req "
        "| server cores | wrk cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ops in results["summary"].items():
        for level, f in ops.get("Decrypt", {}).items():
            lines.append(
                f"| {LABELS[name]} | {level} | {_fmt(f['rps'])} | {_fmt(f['p50_ms'], 2)} | "
                f"{_fmt(f['p90_ms'], 2)} | {_fmt(f['p99_ms'], 2)} | {_fmt(f['max_ms'], 1)} | "
                f"{f['errors']} | {_fmt(f['server_cpu_us_per_request'])} | "
                f"{_fmt(f['server_cores'], 2)} | {_fmt(f['wrk_cores'], 2)} |")
    raw = results.get("raw_hsm")
    if raw:
        s = raw["summary"]
        lines += ["", "## Raw HSM (python-pkcs11 → SoftHSM2, one thread, no HTTP)", "",
                  "| operation | ops/s | CPU µs/op | p50 µs | p99 µs |",
                  "|---|---:|---:|---:|---:|"]
        for op in ("decrypt", "encrypt"):
            lines.append(f"| AES-256-GCM {op} 32 B | {_fmt(s[op]['ops_per_s'])} | "
                         f"{_fmt(s[op]['cpu_us_per_op'], 1)} | "
                         f"{_fmt(s[op]['latency_us']['p50'], 1)} | "
                         f"{_fmt(s[op]['latency_us']['p99'], 1)} |")
    other_ops = settings["ops"]
    if other_ops:
        lines += ["", f"## Encrypt and GenerateDataKey (c = {settings['op_level']})", "",
                  "| server | operation | req/s | p50 ms | p99 ms | errors | server CPU µs/req |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, ops in results["summary"].items():
            for op in ["Decrypt", *other_ops]:
                f = ops.get(op, {}).get(str(settings["op_level"]))
                if f:
                    lines.append(f"| {LABELS[name]} | {op} | {_fmt(f['rps'])} | "
                                 f"{_fmt(f['p50_ms'], 2)} | {_fmt(f['p99_ms'], 2)} | "
                                 f"{f['errors']} | {_fmt(f['server_cpu_us_per_request'])} |")
    if results["ratios"]:
        levels = settings["levels"]
        lines += ["", "## Ratios (within each run, median over runs)", "",
                  "| ratio | " + " | ".join(f"c={lv}" for lv in levels) + " |",
                  "|---|" + "---:|" * len(levels)]
        for name, per_level in results["ratios"].items():
            cells = [_fmt(per_level[str(lv)]["median"], 2) if str(lv) in per_level else ""
                     for lv in levels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## The issue's targets", "", "| target | c | measured | bound | met |",
              "|---|---:|---:|---:|---|"]
    for check in results["issue_targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[check["met"]]
        lines.append(f"| {check['target']} | {check['concurrency']} | "
                     f"{_fmt(check['value'], 2)} | {check['bound']:g} | {met} |")
    return "\n".join(lines) + "\n"


COLORS = {"kmsd3": "#1f77b4", "kmsd1": "#17becf", "moto": "#d62728", "null": "#7f7f7f",
          "minimal": "#2ca02c", "raw_hsm": "#9467bd"}


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    def plain(value: float, _pos: int) -> str:
        if value >= 1000:
            return f"{value / 1000:g}k"
        return f"{value:g}"

    levels = results["settings"]["levels"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    panels = [("rps", "Decrypt throughput (req/s)", axes[0][0]),
              ("p50_ms", "p50 latency (ms)", axes[0][1]),
              ("p90_ms", "p90 latency (ms)", axes[1][0]),
              ("p99_ms", "p99 latency (ms)", axes[1][1])]
    raw = results.get("raw_hsm")
    for metric, title, ax in panels:
        for name, ops in results["summary"].items():
            series = ops.get("Decrypt", {})
            xs = [lv for lv in levels if str(lv) in series]
            ys = [series[str(lv)][metric] for lv in xs]
            ax.plot(xs, ys, marker="o", color=COLORS[name], label=LABELS[name], linewidth=2)
        if raw:
            s = raw["summary"]["decrypt"]
            value = (s["ops_per_s"] if metric == "rps"
                     else s["latency_us"][metric.split("_")[0]] / 1000.0)
            ax.axhline(value, color=COLORS["raw_hsm"], linestyle="--",
                       label=f"{LABELS['raw_hsm']}, 1 thread")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels)
        ax.set_xticklabels([str(lv) for lv in levels])
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(plain))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda _v, _p: ""))
        ax.set_xlabel("concurrency (connections in flight)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, fontsize=10)
    machine = results["machine"]
    fig.suptitle(f"kmsd Decrypt vs peers — {results['date']}, {machine['cores']} cores, "
                 f"load avg {results['loadavg']['start'][0]:.1f} → "
                 f"{results['loadavg']['end'][0]:.1f}; medians of "
                 f"{results['settings']['runs']} × {results['settings']['duration_s']:g} s",
                 fontsize=13)
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 run of 2 s per figure, short warm-up (smoke testing)")
    parser.add_argument("--runs", type=int, default=None, help="repetitions (default 3)")
    parser.add_argument("--duration", type=int, default=None,
                        help="whole seconds per wrk run (default 6)")
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)),
                        help="Decrypt concurrency levels")
    parser.add_argument("--ops", default=",".join(OPS),
                        help="operations measured at --op-level besides Decrypt")
    parser.add_argument("--op-level", type=int, default=64)
    parser.add_argument("--targets", default=",".join(ALL_TARGETS),
                        help=f"subset of {','.join(ALL_TARGETS)}")
    parser.add_argument("--api-workers", type=parse_api_workers, default="0",
                        help="API worker processes per kmsd node besides its primary: N, or "
                             "per target as kmsd1=N,kmsd3=M")
    parser.add_argument("--out-dir", default=benchlib.RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    API_WORKERS.update(args.api_workers)
    args.runs = args.runs or (1 if args.quick else 3)
    args.duration = args.duration or (2 if args.quick else 6)
    args.warmup = 1 if args.quick else 2
    args.pause = 0.2 if args.quick else 0.5
    args.idle = 1.0 if args.quick else 3.0
    if benchlib.wrk_path() is None:
        print("wrk is not installed: run bench/setup.sh", file=sys.stderr)
        return 2
    results = run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    host = results["machine"]["host"]
    base = os.path.join(args.out_dir, f"decrypt-{results['date']}")
    json_path = f"{base}-{host}.json"
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=1)
    with open(f"{base}.md", "w") as handle:
        handle.write(markdown(results))
    if not args.no_plot:
        plot(results, f"{base}-{host}.png")
    print(json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
