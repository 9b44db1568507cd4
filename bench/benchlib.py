"""Shared machinery of the benchmarks in bench/: signing, wrk, CPU accounting, processes.

Everything here talks to 127.0.0.1 only. Every process a benchmark starts is
registered with a `Processes` object and stopped by its pid (SIGTERM, then
SIGKILL after a grace period); every load is bounded by wrk's `-d` duration
and a wall-clock timeout on the wrk process itself.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import json
import os
import platform
import random
import resource
import secrets
import select
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
REPLAY_LUA = os.path.join(BENCH_DIR, "wrk", "replay.lua")
LOOPBACK = "127.0.0.1"
CONTENT_TYPE = "application/x-amz-json-1.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- SigV4 signing (the client side; what botocore does for a JSON 1.1 service) -------------

@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"


def _signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = f"AWS4{secret}".encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def signed_headers(host: str, target: str, body: bytes, creds: Credentials,
                   now: dt.datetime | None = None) -> list[tuple[str, str]]:
    """Headers of a SigV4-signed `POST /` for the KMS JSON protocol (signature valid 5 min)."""
    now = now or dt.datetime.now(dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    headers = {"content-type": CONTENT_TYPE, "host": host, "x-amz-date": amz_date,
               "x-amz-target": f"TrentService.{target}"}
    names = sorted(headers)
    canonical = "\n".join([
        "POST", "/", "", "".join(f"{n}:{headers[n]}\n" for n in names), ";".join(names),
        hashlib.sha256(body).hexdigest()])
    scope = f"{date}/{creds.region}/kms/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    signature = hmac.new(_signing_key(creds.secret_access_key, date, creds.region, "kms"),
                         to_sign.encode(), hashlib.sha256).hexdigest()
    return [("Host", host), ("Content-Type", CONTENT_TYPE),
            ("X-Amz-Target", f"TrentService.{target}"), ("X-Amz-Date", amz_date),
            ("Authorization", f"AWS4-HMAC-SHA256 Credential={creds.access_key_id}/{scope}, "
                              f"SignedHeaders={';'.join(names)}, Signature={signature}")]


def raw_request(endpoint: str, target: str, params: dict[str, Any], creds: Credentials) -> bytes:
    """The bytes of one signed keep-alive HTTP/1.1 request, as wrk will replay them."""
    host = endpoint.split("://", 1)[-1].rstrip("/")
    body = json.dumps(params, separators=(",", ":")).encode()
    headers = signed_headers(host, target, body, creds)
    lines = ["POST / HTTP/1.1"] + [f"{n}: {v}" for n, v in headers] + [
        f"Content-Length: {len(body)}", "User-Agent: kmsd-bench/wrk", "", ""]
    return "\r\n".join(lines).encode() + body


def write_requests(path: str, requests: Iterable[bytes]) -> int:
    count = 0
    with open(path, "wb") as handle:
        for request in requests:
            handle.write(f"{len(request)}\n".encode() + request)
            count += 1
    return count


def call(endpoint: str, target: str, params: dict[str, Any], creds: Credentials,
         timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    """One signed API call (preflight checks, set-up); returns (status, decoded JSON)."""
    host = endpoint.split("://", 1)[-1].rstrip("/")
    body = json.dumps(params, separators=(",", ":")).encode()
    connection = http.client.HTTPConnection(host, timeout=timeout)
    try:
        connection.request("POST", "/", body=body,
                           headers=dict(signed_headers(host, target, body, creds)))
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        decoded = json.loads(data) if data else {}
    except ValueError:
        decoded = {"raw": data[:200].decode("latin-1")}
    return response.status, decoded


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- processes ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def ports_free(ports: Sequence[int]) -> bool:
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                return False
    return True


def wait_http(url: str, timeout: float, ok: Iterable[int] = (200,)) -> None:
    deadline = time.monotonic() + timeout
    accepted = set(ok)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status in accepted:
                    return
        except urllib.error.HTTPError as error:
            if error.code in accepted:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout:.0f}s")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class Processes:
    """Every process a benchmark starts, stopped by pid at the end (or on an error)."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, args: Sequence[str], log_path: str, env: dict[str, str] | None = None,
              stdout_pipe: bool = False, cwd: str | None = None) -> subprocess.Popen:
        log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
        process = subprocess.Popen(
            list(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log, stderr=log,
            env={**os.environ, **(env or {})}, cwd=cwd or REPO_DIR)
        log.close()
        self.started.append(process)
        return process

    def stop(self, process: subprocess.Popen, grace: float = 20.0) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()

    def stop_all(self) -> None:
        for process in reversed(self.started):
            with contextlib.suppress(Exception):
                self.stop(process)
        self.started.clear()


# -- CPU and memory from /proc --------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    children = [int(c) for c in handle.read().split()]
            except OSError:
                continue
            found.extend(children)
            stack.extend(children)
    return found


def stat_cpu_seconds(stat_path: str) -> tuple[float, float] | None:
    """(user, system) CPU seconds from a /proc .../stat file; None once it is gone."""
    try:
        with open(stat_path) as handle:
            fields = handle.read().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    # After the command: state(0) ... utime is field 14 of stat, i.e. index 11 here.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def process_cpu_seconds(pid: int) -> float:
    used = stat_cpu_seconds(f"/proc/{pid}/stat")
    return 0.0 if used is None else used[0] + used[1]


def tree_cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime of the processes and all their descendants (threads included)."""
    total = 0.0
    for pid in pids:
        for member in [pid, *descendants(pid)]:
            total += process_cpu_seconds(member)
    return total


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def loadavg() -> list[float]:
    with open("/proc/loadavg") as handle:
        return [float(v) for v in handle.read().split()[:3]]


# -- wrk ------------------------------------------------------------------------------------

def wrk_path() -> str | None:
    return shutil.which("wrk")


@dataclass
class WrkTarget:
    """One wrk process: a URL and the file of pre-signed requests it replays."""

    url: str
    requests_file: str
    connections: int


def split_connections(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def merge_percentiles(results: Sequence[dict[str, Any]],
                      wanted: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    """Percentiles of the union of several wrk runs, from each run's percentile grid.

    Each grid point stands for the requests between it and the previous grid point
    (weighted by that run's request count); the merged percentile is read off the
    pooled, sorted points. Exact for one run; within one grid step for several.
    """
    points: list[tuple[float, float]] = []
    for result in results:
        count = result["requests"]
        previous = 0.0
        for percentile, value in result["percentiles_us"]:
            points.append((value, count * (percentile - previous) / 100.0))
            previous = percentile
        points.append((result["latency_us"]["max"], count * (100.0 - previous) / 100.0))
    points.sort()
    total = sum(weight for _, weight in points) or 1.0
    merged: dict[str, float] = {}
    for want in wanted:
        running = 0.0
        value = points[-1][0] if points else 0.0
        for point_value, weight in points:
            running += weight
            if running >= total * want / 100.0 - 1e-9:
                value = point_value
                break
        merged[f"p{want:g}"] = value / 1000.0
    return merged


def run_wrk(targets: Sequence[WrkTarget], duration: float, timeout_s: float = 10.0
            ) -> dict[str, Any]:
    """Run one wrk per target at once (1 thread each); the summed and merged result.

    Generator CPU comes from wait4()'s rusage of each wrk process (exact, all threads).
    """
    wrk = wrk_path()
    if wrk is None:
        raise RuntimeError("wrk is not installed: run bench/setup.sh")
    # wrk takes whole seconds only.
    duration = max(1, round(duration))
    timeout_s = max(1, round(timeout_s))
    procs = []
    started = time.monotonic()
    for target in targets:
        args = [wrk, "-t1", f"-c{target.connections}", f"-d{duration}s",
                f"--timeout={timeout_s}s", "-s", REPLAY_LUA, target.url, "--",
                target.requests_file]
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, cwd=REPO_DIR))
    outputs: list[dict[str, Any]] = []
    wrk_cpu = 0.0
    deadline = started + duration + timeout_s + 30
    for proc in procs:
        out_chunks: list[bytes] = []
        assert proc.stdout is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out_chunks.append(chunk)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
        wrk_cpu += usage.ru_utime + usage.ru_stime
        text = b"".join(out_chunks).decode(errors="replace")
        line = next((ln for ln in text.splitlines() if ln.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result (exit {proc.returncode}): {err[-500:]}"
                               f" {text[-500:]}")
        outputs.append(json.loads(line[len("WRKJSON "):]))
    wall = max(o["duration_us"] for o in outputs) / 1e6
    requests = sum(o["requests"] for o in outputs)
    errors = {k: sum(o["errors"][k] for o in outputs) for k in outputs[0]["errors"]}
    latency = merge_percentiles(outputs)
    latency["max"] = max(o["latency_us"]["max"] for o in outputs) / 1000.0
    latency["mean"] = (sum(o["latency_us"]["mean"] * o["requests"] for o in outputs)
                       / max(requests, 1) / 1000.0)
    return {
        "concurrency": sum(t.connections for t in targets),
        "requests": requests, "seconds": wall, "rps": requests / wall if wall else 0.0,
        "errors": errors, "error_count": sum(errors.values()),
        "latency_ms": latency, "wrk_cpu_seconds": wrk_cpu,
        "wrk_cores": wrk_cpu / wall if wall else 0.0,
        "per_wrk": [{"url": t.url, "connections": t.connections, "requests": o["requests"]}
                    for t, o in zip(targets, outputs, strict=True)],
    }


def measure(targets: Sequence[WrkTarget], duration: float, server_pids: Sequence[int],
            timeout_s: float = 10.0) -> dict[str, Any]:
    """One wrk run with the servers' CPU (process trees) counted around it."""
    load = loadavg()
    cpu_before = tree_cpu_seconds(server_pids)
    result = run_wrk(targets, duration, timeout_s)
    cpu_after = tree_cpu_seconds(server_pids)
    server_cpu = max(cpu_after - cpu_before, 0.0)
    result["server_cpu_seconds"] = server_cpu
    result["server_cores"] = server_cpu / result["seconds"] if result["seconds"] else 0.0
    result["server_cpu_us_per_request"] = (server_cpu / result["requests"] * 1e6
                                           if result["requests"] else None)
    result["loadavg_1m_before"] = load[0]
    return result


# -- SoftHSM2 tokens ------------------------------------------------------------------------

def random_text(length: int) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass(frozen=True)
class Token:
    conf: str
    label: str
    pin: str = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": self.conf}


def make_token(root: str, label: str) -> Token:
    """A fresh SoftHSM2 token in its own directory (configuration file beside it)."""
    tokens = os.path.join(root, "tokens")
    os.makedirs(tokens, exist_ok=True)
    conf = os.path.join(root, "softhsm2.conf")
    with open(conf, "w") as handle:
        handle.write(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                     "log.level = ERROR\n")
    pin = random_text(16)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--so-pin", random_text(16), "--pin", pin],
                   check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": conf})
    return Token(conf, label, pin)


def softhsm_module() -> str:
    from kmsd.hsm.partition import softhsm_module_path

    return softhsm_module_path()


# -- kmsd dev clusters ----------------------------------------------------------------------

@dataclass
class KmsdCluster:
    info: dict[str, Any]
    process: subprocess.Popen
    data_dir: str

    @property
    def endpoints(self) -> list[str]:
        return self.info["endpoints"]

    @property
    def pids(self) -> list[int]:
        return self.info["pids"]

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.info["access_key_id"], self.info["secret_access_key"],
                           self.info["region"])


def kmsd_base_port(nodes: int) -> int:
    for _ in range(200):
        base = random.randrange(20000, 40000, 10)
        if ports_free([base + offset + i for offset in (0, 100, 200) for i in range(nodes)]):
            return base
    raise RuntimeError("no free port range")


def start_kmsd(processes: Processes, data_dir: str, nodes: int, timeout: float = 120.0,
               api_workers: int = 0, repo_dir: str | None = None) -> KmsdCluster:
    """`kmsd dev --nodes N` on 127.0.0.1; returns once every node is ready. It runs in
    `repo_dir` (this tree by default), so that tree's kmsd is the one imported."""
    base = kmsd_base_port(nodes)
    os.makedirs(data_dir, exist_ok=True)
    process = processes.start(
        [sys.executable, "-m", "kmsd.cli", "dev", "--nodes", str(nodes), "--data-dir", data_dir,
         "--port", str(base), "--api-workers", str(api_workers)],
        os.path.join(data_dir, "dev.log"), stdout_pipe=True, cwd=repo_dir)
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else b""
    if not line:
        processes.stop(process)
        with open(os.path.join(data_dir, "dev.log"), errors="replace") as handle:
            raise RuntimeError(f"kmsd dev did not start: {handle.read()[-3000:]}")
    return KmsdCluster(json.loads(line), process, data_dir)


# -- what the results are measured on -------------------------------------------------------

def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _command_version(args: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else None


def machine_info() -> dict[str, Any]:
    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    return {"host": platform.node(), "cores": os.cpu_count(), "model_name": model,
            "memory_bytes": memory, "kernel": platform.release(),
            "max_open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def versions() -> dict[str, Any]:
    dpkg = _command_version(["dpkg-query", "-W", "-f", "${Version}", "softhsm2"])
    return {
        "python": platform.python_version(),
        "kmsd": _version("kmsd"), "pysyncobj": _version("pysyncobj"),
        "python-pkcs11": _version("python-pkcs11"), "aiohttp": _version("aiohttp"),
        "botocore": _version("botocore"), "cryptography": _version("cryptography"),
        "moto": _version("moto"), "softhsm": dpkg or _command_version(["softhsm2-util", "-v"]),
        "wrk": _command_version([wrk_path() or "wrk", "-v"]),
    }


def now_stamp() -> tuple[str, str]:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%d"), now.strftime("%Y-%m-%dT%H:%M:%SZ")


def metric_samples(endpoint: str, timeout: float = 5.0) -> list[Sample]:
    """Every sample of a kmsd node's /metrics (prometheus_client's parser: counters are
    named with `_total`, histograms as `_bucket`, `_sum` and `_count`)."""
    with urllib.request.urlopen(endpoint + "/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    return [sample for family in text_string_to_metric_families(text)
            for sample in family.samples]


def print_and_save(result: dict[str, Any], text: str, json_path: str | None) -> None:
    """A benchmark's table on stdout and, when asked for, its whole result as JSON."""
    print(text)
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(result, handle, indent=1)


def median(values: Sequence[float | None]) -> float | None:
    present = sorted(v for v in values if v is not None)
    if not present:
        return None
    mid = len(present) // 2
    return present[mid] if len(present) % 2 else (present[mid - 1] + present[mid]) / 2
