#!/usr/bin/env python3
"""kmsd at scale: many keys in a 3-node cluster.

Starts `kmsd dev --nodes 3` on 127.0.0.1 and:

1. creates --keys keys (default 100,000) through the API with --threads client threads
   (each thread keeps one connection to one node, threads spread over the nodes); for
   the keys of the working set it also asks GenerateDataKey, to have a ciphertext;
2. measures each node's RSS (/proc) before and after, i.e. memory per key;
3. measures the Raft snapshot: the raft.snapshot size on every node, and the time to
   write one (the node's own path: KmsState.to_snapshot + pysyncobj's gzip'd pickle,
   which a node runs in a forked child; timed here in a child process on the node's
   state) and to load it again;
4. measures restart-to-ready of a follower (SIGTERM + start, and SIGKILL + start):
   until /readyz answers 200, and until it serves a Decrypt;
5. measures Decrypt throughput (wrk, load over all nodes) with the working set spread
   over --working-set keys (default: every key, at most 20,000), so that the per-node
   handle cache (4,096 unwrapped keys) misses, beside a hot single-key Decrypt in the
   same run; the nodes' handle-cache hit/miss counters are read around each.

    .venv/bin/python bench/scale.py --keys 10000
    .venv/bin/python bench/scale.py --keys 1000 --duration 3      # quick

Writes bench/results/scale-<date>-<host>.json and scale-<date>.md (or into --out-dir).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import benchlib
from benchlib import Credentials, Processes, WrkTarget


class Client:
    """One persistent connection to one node, signing each call."""

    def __init__(self, endpoint: str, creds: Credentials) -> None:
        self.host = endpoint.split("://", 1)[-1]
        self.creds = creds
        self.connection = http.client.HTTPConnection(self.host, timeout=30)

    def call(self, op: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        body = json.dumps(params, separators=(",", ":")).encode()
        for attempt in range(3):
            try:
                self.connection.request("POST", "/", body=body, headers=dict(
                    benchlib.signed_headers(self.host, op, body, self.creds)))
                response = self.connection.getresponse()
                return response.status, json.loads(response.read() or b"{}")
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = http.client.HTTPConnection(self.host, timeout=30)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def create_keys(cluster: benchlib.KmsdCluster, count: int, threads: int, sample_every: int,
                deadline: float) -> dict[str, Any]:
    """CreateKey × count over `threads` threads; GenerateDataKey for every sample_every-th."""
    lock = threading.Lock()
    next_index = [0]
    created: list[str] = []
    ciphertexts: list[str] = []
    errors: list[str] = []
    latencies: list[float] = []
    progress: list[tuple[float, int]] = []
    began = time.monotonic()

    def worker(number: int) -> None:
        client = Client(cluster.endpoints[number % len(cluster.endpoints)], cluster.credentials)
        while time.monotonic() < deadline:
            with lock:
                index = next_index[0]
                if index >= count:
                    return
                next_index[0] += 1
            started = time.perf_counter()
            status, body = client.call("CreateKey", {"Description": f"scale-{index}"})
            elapsed = time.perf_counter() - started
            if status != 200:
                with lock:
                    errors.append(f"CreateKey {status} {body.get('__type')}: "
                                  f"{str(body.get('message'))[:120]}")
                continue
            key_id = body["KeyMetadata"]["KeyId"]
            blob = None
            if index % sample_every == 0:
                status, made = client.call("GenerateDataKey",
                                           {"KeyId": key_id, "KeySpec": "AES_256"})
                if status == 200:
                    blob = made["CiphertextBlob"]
                else:
                    with lock:
                        errors.append(f"GenerateDataKey {status} {made.get('__type')}: "
                                      f"{str(made.get('message'))[:120]}")
            with lock:
                created.append(key_id)
                latencies.append(elapsed)
                if blob:
                    ciphertexts.append(blob)
                done = len(created)
                if done % 1000 == 0:
                    progress.append((time.monotonic() - began, done))
            if done % 1000 == 0:
                print(f"  {done} keys", file=sys.stderr, flush=True)

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(max(1.0, deadline - time.monotonic() + 60))
    seconds = time.monotonic() - began
    latencies.sort()

    def pick(q: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 \
            if latencies else None

    return {"created": len(created), "seconds": seconds,
            "keys_per_second": len(created) / seconds if seconds else 0.0,
            "create_latency_ms": {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)},
            "errors": len(errors), "error_samples": errors[:10], "threads": threads,
            "ciphertexts": ciphertexts, "timed_out": len(created) < count,
            # (seconds since the start, keys created): the rate as the state grows.
            "progress": [{"seconds": t, "keys": k} for t, k in progress]}


# -- Raft snapshot --------------------------------------------------------------------------

_SNAPSHOT_TIMER = r"""
import gzip, io, json, sys, time
import pysyncobj.pickle as pickle
from cluster.state import KmsState

path = sys.argv[1]
t0 = time.perf_counter()
with open(path, "rb") as f, gzip.GzipFile(fileobj=f) as g:
    data = pickle.load(g)
t_unpickle = time.perf_counter() - t0
# pysyncobj's dump: (serialized state, last applied entry, previous entry, cluster nodes);
# the kmsd consumer's part is the msgpack bytes of KmsState.to_snapshot().
def find_bytes(obj):
    if isinstance(obj, (bytes, bytearray)) and len(obj) > 16:
        yield bytes(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from find_bytes(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from find_bytes(v)
blob = max(find_bytes(data), key=len)
state = KmsState()
t0 = time.perf_counter(); state.restore_snapshot(blob); t_restore = time.perf_counter() - t0
t0 = time.perf_counter(); again = state.to_snapshot(); t_serialize = time.perf_counter() - t0
t0 = time.perf_counter()
buf = io.BytesIO()
with gzip.GzipFile(fileobj=buf, mode="wb") as g:
    pickle.dump(data, g)
t_write = time.perf_counter() - t0
print(json.dumps({"keys": len(state.keys), "state_msgpack_bytes": len(again),
                  "serialize_s": t_serialize, "pickle_gzip_s": t_write,
                  "snapshot_write_s": t_serialize + t_write,
                  "load_unpickle_gunzip_s": t_unpickle, "load_restore_s": t_restore,
                  "snapshot_load_s": t_unpickle + t_restore}))
"""


def snapshot_files(cluster: benchlib.KmsdCluster) -> list[dict[str, Any]]:
    files = []
    for node in range(len(cluster.endpoints)):
        raft_dir = os.path.join(cluster.data_dir, f"node-{node + 1}", "data", "raft")
        entry: dict[str, Any] = {"node": node + 1}
        for name in ("raft.snapshot", "raft.journal"):
            path = os.path.join(raft_dir, name)
            entry[name] = os.path.getsize(path) if os.path.exists(path) else None
        entry["snapshot_mtime"] = (os.path.getmtime(os.path.join(raft_dir, "raft.snapshot"))
                                   if entry["raft.snapshot"] else None)
        files.append(entry)
    return files


def time_snapshot(cluster: benchlib.KmsdCluster, node: int) -> dict[str, Any] | None:
    path = os.path.join(cluster.data_dir, f"node-{node + 1}", "data", "raft", "raft.snapshot")
    if not os.path.exists(path):
        return None
    copy = path + ".bench-copy"
    shutil.copyfile(path, copy)
    try:
        done = subprocess.run([sys.executable, "-c", _SNAPSHOT_TIMER, copy], capture_output=True,
                              text=True, timeout=600, cwd=benchlib.REPO_DIR, check=False)
    finally:
        os.unlink(copy)
    if done.returncode != 0:
        return {"error": done.stderr[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_snapshot_covering(cluster: benchlib.KmsdCluster, since: float, timeout: float
                           ) -> list[dict[str, Any]]:
    """Wait (bounded) until every node has written a snapshot after `since`."""
    deadline = time.monotonic() + timeout
    while True:
        files = snapshot_files(cluster)
        if all(f["snapshot_mtime"] and f["snapshot_mtime"] >= since for f in files) \
                or time.monotonic() > deadline:
            return files
        time.sleep(1.0)


# -- restart --------------------------------------------------------------------------------

def restart_node(processes: Processes, cluster: benchlib.KmsdCluster, node: int, how: str,
                 probe: dict[str, Any]) -> dict[str, Any]:
    pid = cluster.pids[node]
    os.kill(pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGTERM)
    deadline = time.monotonic() + 60
    while benchlib.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    # The dev supervisor reaps the old process (a zombie counts as dead for `alive`).
    config = cluster.info["configs"][node]
    started = time.monotonic()
    process = processes.start([sys.executable, "-m", "kmsd.cli", "serve", "--config", config],
                              os.path.join(os.path.dirname(config), "node.log"))
    cluster.info["pids"][node] = process.pid
    endpoint = cluster.endpoints[node]
    benchlib.wait_http(endpoint + "/readyz", 300)
    ready = time.monotonic() - started
    decrypt_deadline = time.monotonic() + 120
    while True:
        status, _ = benchlib.call(endpoint, "Decrypt", probe, cluster.credentials)
        if status == 200 or time.monotonic() > decrypt_deadline:
            break
        time.sleep(0.05)
    return {"how": how, "node": node + 1, "ready_s": ready,
            "serving_decrypt_s": time.monotonic() - started, "decrypt_status": status,
            "rss_after_ready_bytes": benchlib.rss_bytes(process.pid)}


# -- Decrypt over the working set -----------------------------------------------------------

def decrypt_load(cluster: benchlib.KmsdCluster, workdir: str, blobs: list[str],
                 concurrency: int, duration: int, name: str) -> dict[str, Any]:
    split = benchlib.split_connections(concurrency, len(cluster.endpoints))
    targets = []
    for index, endpoint in enumerate(cluster.endpoints):
        if split[index] == 0:
            continue
        path = os.path.join(workdir, f"{name}-{index}.req")
        benchlib.write_requests(path, (benchlib.raw_request(
            endpoint, "Decrypt", {"CiphertextBlob": blob}, cluster.credentials)
            for blob in blobs))
        targets.append(WrkTarget(endpoint, path, split[index]))
    before = cache_counters(cluster)
    result = benchlib.measure(targets, duration, cluster.pids)
    after = cache_counters(cluster)
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    misses = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return {"working_set_keys": len(blobs), "concurrency": concurrency, "rps": result["rps"],
            "latency_ms": result["latency_ms"], "errors": result["error_count"],
            "requests": result["requests"],
            "server_cpu_us_per_request": result["server_cpu_us_per_request"],
            "wrk_cores": result["wrk_cores"], "loadavg_1m_before": result["loadavg_1m_before"],
            "handle_cache_hits": hits, "handle_cache_misses": misses,
            "handle_cache_miss_ratio": misses / (hits + misses) if hits + misses else None}


def cache_counters(cluster: benchlib.KmsdCluster) -> list[tuple[int, int]]:
    """Each node's (hits, misses) of the unwrapped-key handle cache, from /metrics."""
    out = []
    for endpoint in cluster.endpoints:
        hits = misses = 0
        try:
            for sample in benchlib.metric_samples(endpoint, timeout=10):
                if sample.name == "kmsd_hsm_handle_cache_hits_total":
                    hits += int(sample.value)
                elif sample.name == "kmsd_hsm_handle_cache_misses_total":
                    misses += int(sample.value)
        except OSError:
            pass
        out.append((hits, misses))
    return out


# -- the run --------------------------------------------------------------------------------

def settle_rss(pids: list[int], seconds: float = 3.0) -> list[int]:
    time.sleep(seconds)
    return [benchlib.rss_bytes(pid) for pid in pids]


def run(args: argparse.Namespace) -> dict[str, Any]:
    date, started_at = benchlib.now_stamp()
    processes = Processes()
    workdir = tempfile.mkdtemp(prefix="kmsd-scale-")
    load_start = benchlib.loadavg()
    results: dict[str, Any] = {}
    try:
        print("starting a 3-node cluster ...", file=sys.stderr, flush=True)
        cluster = benchlib.start_kmsd(processes, os.path.join(workdir, "kmsd3"), 3)
        rss_before = settle_rss(cluster.pids)
        working = min(args.keys, args.working_set)
        sample_every = max(1, args.keys // working)
        print(f"creating {args.keys} keys with {args.threads} threads ...", file=sys.stderr,
              flush=True)
        creation_started = time.time()
        creation = create_keys(cluster, args.keys, args.threads, sample_every,
                               time.monotonic() + args.max_create_seconds)
        blobs = creation.pop("ciphertexts")
        results["creation"] = creation
        rss_after = settle_rss(cluster.pids, 5.0)
        created = creation["created"] or 1
        results["memory"] = [
            {"node": n + 1, "rss_before_bytes": b, "rss_after_bytes": a,
             "bytes_per_key": (a - b) / created}
            for n, (b, a) in enumerate(zip(rss_before, rss_after, strict=True))]
        print("waiting for a snapshot covering the keys ...", file=sys.stderr, flush=True)
        results["snapshot_files"] = wait_snapshot_covering(
            cluster, creation_started + creation["seconds"] - 1, args.snapshot_wait)
        results["snapshot_timing"] = time_snapshot(cluster, 1)
        print("Decrypt over the working set ...", file=sys.stderr, flush=True)
        hot = blobs[:1]
        spread_runs, hot_runs = [], []
        for _ in range(args.runs):
            spread_runs.append(decrypt_load(cluster, workdir, blobs, args.concurrency,
                                            args.duration, "spread"))
            hot_runs.append(decrypt_load(cluster, workdir, hot, args.concurrency,
                                         args.duration, "hot"))
        results["decrypt_spread"] = {"runs": spread_runs,
                                     "median_rps": benchlib.median([r["rps"]
                                                                    for r in spread_runs])}
        results["decrypt_hot"] = {"runs": hot_runs,
                                  "median_rps": benchlib.median([r["rps"] for r in hot_runs])}
        results["spread_over_hot"] = benchlib.median(
            [s["rps"] / h["rps"] for s, h in zip(spread_runs, hot_runs, strict=True)
             if h["rps"]])
        print("restarting a follower ...", file=sys.stderr, flush=True)
        probe = {"CiphertextBlob": blobs[-1]}
        follower = len(cluster.endpoints) - 1
        results["restart"] = [restart_node(processes, cluster, follower, how, probe)
                              for how in ("SIGTERM", "SIGKILL")]
    finally:
        processes.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    _, finished_at = benchlib.now_stamp()
    return {"benchmark": "scale", "date": date, "started_at": started_at,
            "finished_at": finished_at, "machine": benchlib.machine_info(),
            "versions": benchlib.versions(),
            "loadavg": {"start": load_start, "end": benchlib.loadavg()},
            "settings": {"keys": args.keys, "threads": args.threads,
                         "working_set": min(args.keys, args.working_set),
                         "concurrency": args.concurrency, "duration_s": args.duration,
                         "runs": args.runs},
            **results}


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f}"


def markdown(r: dict[str, Any]) -> str:
    c = r["creation"]
    lines = [
        f"# Scale benchmark, {r['date']}", "",
        f"{r['settings']['keys']:,} keys requested, {c['created']:,} created on a 3-node "
        f"`kmsd dev` cluster ({r['machine']['cores']} cores, load average "
        f"{r['loadavg']['start'][0]:.2f} at start, {r['loadavg']['end'][0]:.2f} at end).", "",
        "## Creation", "",
        f"- {c['keys_per_second']:.0f} keys/s with {c['threads']} client threads over the "
        f"three nodes ({c['seconds']:.0f} s; each key is a CreateKey, plus a GenerateDataKey "
        f"for the {r['settings']['working_set']:,} keys of the Decrypt working set); "
        f"CreateKey latency p50 "
        f"{c['create_latency_ms']['p50']:.1f} ms, p99 {c['create_latency_ms']['p99']:.1f} ms; "
        f"{c['errors']} errors (no client retries)"
        + (f", e.g. {c['error_samples'][0]}" if c['error_samples'] else "") + ".", ""]
    if c.get("progress"):
        lines += ["Creation rate as the state grows (keys/s over each 1,000 keys):", ""]
        previous = (0.0, 0)
        rates = []
        for point in c["progress"]:
            span = point["seconds"] - previous[0]
            rates.append(f"{point['keys']:,}: {(point['keys'] - previous[1]) / span:.0f}"
                         if span > 0 else f"{point['keys']:,}: –")
            previous = (point["seconds"], point["keys"])
        lines += ["; ".join(rates) + ".", ""]
    lines += [
        "## Memory (RSS)", "", "| node | before MiB | after MiB | bytes per key |",
        "|---:|---:|---:|---:|"]
    for m in r["memory"]:
        lines.append(f"| {m['node']} | {_mb(m['rss_before_bytes'])} | "
                     f"{_mb(m['rss_after_bytes'])} | {m['bytes_per_key']:,.0f} |")
    lines += ["", "## Raft snapshot", "", "| node | raft.snapshot bytes | raft.journal bytes |",
              "|---:|---:|---:|"]
    for f in r["snapshot_files"]:
        lines.append(f"| {f['node']} | {f['raft.snapshot'] or 0:,} | {f['raft.journal'] or 0:,} |")
    t = r.get("snapshot_timing") or {}
    if "snapshot_write_s" in t:
        lines += ["", f"Snapshot of {t['keys']:,} keys ({t['state_msgpack_bytes']:,} bytes of "
                  f"msgpack before gzip): write {t['snapshot_write_s'] * 1000:,.0f} ms "
                  f"(to_snapshot {t['serialize_s'] * 1000:,.0f} ms + pickle/gzip "
                  f"{t['pickle_gzip_s'] * 1000:,.0f} ms, done in the child pysyncobj "
                  "forks: the tick only forks), load "
                  f"{t['snapshot_load_s'] * 1000:,.0f} ms."]
    lines += ["", "## Restart to ready (a follower)", "",
              "| how | to /readyz 200 s | to serving Decrypt s | RSS after ready MiB |",
              "|---|---:|---:|---:|"]
    for x in r["restart"]:
        lines.append(f"| {x['how']} | {x['ready_s']:.2f} | {x['serving_decrypt_s']:.2f} | "
                     f"{_mb(x['rss_after_ready_bytes'])} |")
    lines += ["", f"## Decrypt, c = {r['settings']['concurrency']} over all nodes", "",
              "| working set | req/s | p50 ms | p99 ms | errors | handle-cache miss ratio | "
              "server CPU µs/req |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, key in (("spread over the keys", "decrypt_spread"), ("one hot key", "decrypt_hot")):
        for run_ in r[key]["runs"]:
            miss = run_["handle_cache_miss_ratio"]
            lines.append(
                f"| {name} ({run_['working_set_keys']:,} keys) | {run_['rps']:,.0f} | "
                f"{run_['latency_ms']['p50']:.1f} | {run_['latency_ms']['p99']:.1f} | "
                f"{run_['errors']} | {'–' if miss is None else f'{miss:.2f}'} | "
                f"{run_['server_cpu_us_per_request'] or 0:,.0f} |")
    if r.get("spread_over_hot"):
        lines += ["", f"Spread / hot throughput (same run, median): {r['spread_over_hot']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=12)
    parser.add_argument("--working-set", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-create-seconds", type=float, default=3600.0,
                        help="stop creating keys after this long (the count is reported)")
    parser.add_argument("--snapshot-wait", type=float, default=150.0,
                        help="how long to wait for every node to snapshot after creation")
    parser.add_argument("--out-dir", default=benchlib.RESULTS_DIR)
    args = parser.parse_args(argv)
    if benchlib.wrk_path() is None:
        print("wrk is not installed: run bench/setup.sh", file=sys.stderr)
        return 2
    results = run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"scale-{results['date']}-{args.keys // 1000}k")
    json_path = f"{base}-{results['machine']['host']}.json"
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=1)
    with open(f"{base}.md", "w") as handle:
        handle.write(markdown(results))
    print(json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
