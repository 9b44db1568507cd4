#!/usr/bin/env python3
"""Decrypt throughput while the Raft leader is killed: a time series, plotted.

Starts its own 3-node dev cluster on 127.0.0.1, makes a key and a data key, and
drives a steady Decrypt load (asyncio + aiohttp, `--workers` requests in flight,
spread over the three nodes; a worker whose node stops answering moves on to the
next endpoint, as a client behind a load balancer would). Each round: load for
`--before` seconds, SIGKILL of the leader, load for `--after` seconds, restart of
the killed node, load until `--rest` seconds after its restart. Every answer is
put in a 100 ms bin by its completion time: successes, errors and the latency
of successes. Marked on the series: the kill, the first status report of a new
leader, the restart and the moment the restarted node is ready.

The load generator runs on the same 2 cores as the cluster and costs far more
CPU per request than wrk: the absolute rate here is lower than bench/decrypt.py's
and is not comparable with it; the shape (dip, depth, recovery) is the result.

    .venv/bin/python bench/failover_decrypt.py                 # 3 rounds
    .venv/bin/python bench/failover_decrypt.py --rounds 1 --no-plot

Writes bench/results/failover-decrypt-<date>.json, .png and .md (or --out-dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import benchlib  # noqa: E402

from scripts.failover import Harness  # noqa: E402

BIN_S = 0.1


@dataclass
class Series:
    """Answers by 100 ms bin of completion time, counted from the start of a round."""

    ok: dict[int, int] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)
    latencies: dict[int, list[float]] = field(default_factory=dict)

    def add(self, at: float, latency: float, ok: bool) -> None:
        index = int(at / BIN_S)
        if ok:
            self.ok[index] = self.ok.get(index, 0) + 1
            self.latencies.setdefault(index, []).append(latency)
        else:
            self.errors[index] = self.errors.get(index, 0) + 1

    def rows(self, seconds: float) -> list[dict[str, Any]]:
        out = []
        for index in range(int(seconds / BIN_S)):
            lat = sorted(self.latencies.get(index, []))
            out.append({
                "t": round(index * BIN_S, 1),
                "ok_per_s": self.ok.get(index, 0) / BIN_S,
                "errors_per_s": self.errors.get(index, 0) / BIN_S,
                "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2)
                if lat else None,
            })
        return out


class Load:
    def __init__(self, endpoints: list[str], blob: str, creds: benchlib.Credentials,
                 workers: int) -> None:
        self.endpoints = endpoints
        self.body = json.dumps({"CiphertextBlob": blob}, separators=(",", ":")).encode()
        self.creds = creds
        self.workers = workers
        self.series = Series()
        self.origin = time.monotonic()
        self.running = True
        self._signed: dict[str, tuple[float, dict[str, str]]] = {}

    def _headers(self, endpoint: str) -> dict[str, str]:
        # Re-signed every minute: a signature is accepted for 5.
        signed_at, headers = self._signed.get(endpoint, (0.0, {}))
        if time.monotonic() - signed_at > 60:
            host = endpoint.split("://", 1)[-1].rstrip("/")
            headers = dict(benchlib.signed_headers(host, "Decrypt", self.body, self.creds))
            self._signed[endpoint] = (time.monotonic(), headers)
        return headers

    async def _worker(self, index: int, session: aiohttp.ClientSession) -> None:
        endpoint = index % len(self.endpoints)
        while self.running:
            url = self.endpoints[endpoint]
            started = time.monotonic()
            ok = False
            try:
                async with session.post(url + "/", data=self.body,
                                        headers=self._headers(url)) as response:
                    await response.read()
                    ok = response.status == 200
            except (TimeoutError, aiohttp.ClientError):
                pass
            done = time.monotonic()
            self.series.add(done - self.origin, done - started, ok)
            if not ok:
                endpoint = (endpoint + 1) % len(self.endpoints)
                await asyncio.sleep(0.02)

    async def run(self, seconds: float) -> None:
        timeout = aiohttp.ClientTimeout(total=5, connect=1)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            tasks = [asyncio.create_task(self._worker(i, session)) for i in range(self.workers)]
            await asyncio.sleep(seconds)
            self.running = False
            await asyncio.gather(*tasks, return_exceptions=True)


def one_round(harness: Harness, load_args: tuple[Any, ...], before: float, after: float,
              rest: float) -> dict[str, Any]:
    nodes = list(range(len(harness.cluster.nodes)))
    leader = None
    while leader is None:
        leader = harness.leader(nodes)
    load = Load(*load_args)
    marks: dict[str, float] = {}
    total = before + after + rest + 30

    def faults() -> None:
        time.sleep(before)
        marks["kill"] = time.monotonic() - load.origin
        harness.kill(leader)
        survivors = [n for n in nodes if n != leader]
        while time.monotonic() - load.origin < marks["kill"] + after:
            if "new_leader" not in marks and harness.leader(survivors) is not None:
                marks["new_leader"] = time.monotonic() - load.origin
            time.sleep(0.05)
        marks["restart"] = time.monotonic() - load.origin
        harness.restart(leader)
        marks["restarted_ready"] = time.monotonic() - load.origin

    thread = threading.Thread(target=faults)
    thread.start()

    async def drive() -> None:
        task = asyncio.create_task(load.run(total))
        while thread.is_alive():
            await asyncio.sleep(0.1)
        end = marks["restarted_ready"] + rest
        await asyncio.sleep(max(0.0, end - (time.monotonic() - load.origin)))
        load.running = False
        await task

    asyncio.run(drive())
    thread.join()
    seconds = marks["restarted_ready"] + rest
    rows = load.series.rows(seconds)
    steady = [r["ok_per_s"] for r in rows if r["t"] < marks["kill"] - 0.5 and r["t"] > 1.0]
    baseline = statistics.median(steady) if steady else 0.0
    after_kill = [r for r in rows if r["t"] >= marks["kill"]]
    zero = [r for r in after_kill if r["ok_per_s"] == 0]
    recovered = next((r["t"] for r in after_kill
                      if r["t"] > marks["kill"] + 0.2 and r["ok_per_s"] >= 0.5 * baseline), None)
    return {
        "killed_node": leader, "marks_s": {k: round(v, 3) for k, v in marks.items()},
        "baseline_ok_per_s": baseline,
        "zero_bins_after_kill": len(zero),
        "seconds_without_a_success": round(len(zero) * BIN_S, 1),
        "back_to_half_baseline_s": round(recovered - marks["kill"], 2)
        if recovered is not None else None,
        "errors": sum(load.series.errors.values()),
        "successes": sum(load.series.ok.values()),
        "series": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Decrypt during a leader kill, {report['date'][:10]}", "",
             f"Machine: {report['machine'].get('host')}, {report['machine'].get('cores')} cores; "
             f"load average at start {report['loadavg_start'][0]:.2f}. {report['method']}", "",
             "| round | killed | baseline ok/s | new leader after s | no success for s "
             "| back to half baseline after s | errors | successes |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for index, r in enumerate(report["rounds"], 1):
        marks = r["marks_s"]
        elected = marks.get("new_leader")
        lines.append(
            f"| {index} | node-{r['killed_node'] + 1} | {r['baseline_ok_per_s']:.0f} | "
            f"{(elected - marks['kill']) if elected else float('nan'):.2f} | "
            f"{r['seconds_without_a_success']:.1f} | {r['back_to_half_baseline_s']} | "
            f"{r['errors']} | {r['successes']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    fig, axes = plt.subplots(len(rounds), 1, figsize=(10, 3.2 * len(rounds)), squeeze=False)
    for ax, r in zip(axes[:, 0], rounds, strict=True):
        t = [row["t"] for row in r["series"]]
        ax.plot(t, [row["ok_per_s"] for row in r["series"]], label="Decrypt ok/s", lw=1)
        ax.plot(t, [row["errors_per_s"] for row in r["series"]], label="errors/s", lw=1,
                color="tab:red")
        for name, style in (("kill", "r--"), ("new_leader", "g--"), ("restart", "k:"),
                            ("restarted_ready", "b:")):
            if name in r["marks_s"]:
                ax.axvline(r["marks_s"][name], color=style[0], ls=style[1:], lw=1, label=name)
        ax.set_ylabel("per second (100 ms bins)")
        ax.set_title(f"leader node-{r['killed_node'] + 1} killed")
        ax.legend(loc="lower right", fontsize=7)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=24)
    parser.add_argument("--before", type=float, default=6.0)
    parser.add_argument("--after", type=float, default=8.0)
    parser.add_argument("--rest", type=float, default=4.0)
    parser.add_argument("--port", type=int, default=27900)
    parser.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    harness = Harness.start("kmsd-failover-decrypt-", args.port)
    cluster = harness.cluster
    creds = benchlib.Credentials(cluster.access_key_id, cluster.secret_access_key)
    endpoints = [node.endpoint for node in cluster.nodes]
    loadavg_start = benchlib.loadavg()
    rounds = []
    try:
        client = harness.client(0)
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        blob = benchlib.b64(client.generate_data_key(KeyId=key_id, KeySpec="AES_256")[
            "CiphertextBlob"])
        for endpoint in endpoints:
            benchlib.call(endpoint, "Decrypt", {"CiphertextBlob": blob}, creds)
        for index in range(args.rounds):
            result = one_round(harness, (endpoints, blob, creds, args.workers),
                               args.before, args.after, args.rest)
            rounds.append(result)
            print(f"round {index + 1}: " + json.dumps(
                {k: v for k, v in result.items() if k != "series"}), flush=True)
    finally:
        harness.stop()
    date, stamp = benchlib.now_stamp()
    report = {
        "benchmark": "failover-decrypt", "date": stamp, "machine": benchlib.machine_info(),
        "versions": benchlib.versions(), "loadavg_start": loadavg_start,
        "loadavg_end": benchlib.loadavg(),
        "method": (f"{args.workers} Decrypt requests in flight from one asyncio/aiohttp "
                   "process on the same machine, spread over the 3 nodes; a worker moves to "
                   "the next endpoint after a failed request; 100 ms bins."),
        "settings": vars(args), "rounds": rounds,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"failover-decrypt-{date}")
    with open(stem + ".json", "w") as handle:
        json.dump(report, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(report))
    if not args.no_plot:
        plot(report, stem + ".png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
