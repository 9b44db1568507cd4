"""Smoke test of bench/slow_waves.py: a single node loaded for a second, its access lines
read back and bucketed, and the JSON it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bench.test_bench_smoke import _ensure_wrk

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLOW_WAVES = os.path.join(REPO, "bench", "slow_waves.py")


@pytest.mark.timeout(240)
def test_slow_waves_reads_every_answered_decrypt_from_the_access_lines(tmp_path) -> None:
    _ensure_wrk()
    done = subprocess.run(
        [sys.executable, SLOW_WAVES, "--nodes", "1", "--concurrency", "4", "--duration", "1",
         "--slow-ms", "0", "--bucket-ms", "250", "--out-dir", str(tmp_path), "--no-plot"],
        capture_output=True, text=True, timeout=200, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [name] = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    with open(tmp_path / name) as handle:
        result = json.load(handle)

    assert result["settings"]["nodes"] == 1
    assert result["load"]["errors"] == 0
    node = result["nodes"]["node-1"]
    # Every Decrypt wrk counted is in the node's access lines; wrk stops with up to one
    # request per connection in flight, which the node still answers and logs.
    assert result["load"]["requests"] <= node["requests"] <= result["load"]["requests"] + 4, (
        result["load"]["requests"], node["requests"])
    assert 0 < node["p50_ms"] <= node["p99_ms"]
    # With --slow-ms 0 every request is slow: every bucket that held one counts.
    assert node["slow_requests"] == node["requests"]
    assert sum(node["slow_per_bucket"]) == node["requests"]
    assert len(node["slow_per_bucket"]) == result["buckets"] >= 4
    # One node: no bucket is shared with another.
    assert result["buckets_slow_on_two_or_more_nodes"] == 0
    assert result["expected_if_independent"] == 0
