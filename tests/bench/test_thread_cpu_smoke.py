"""Smoke test of bench/thread_cpu.py: a single node loaded for a second, and the per-thread
CPU it reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bench.test_bench_smoke import _ensure_wrk

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
THREAD_CPU = os.path.join(REPO, "bench", "thread_cpu.py")


@pytest.mark.timeout(240)
def test_thread_cpu_reports_the_threads_that_served(tmp_path) -> None:
    _ensure_wrk()
    out = tmp_path / "thread-cpu.json"
    done = subprocess.run(
        [sys.executable, THREAD_CPU, "--nodes", "1", "--concurrency", "8", "--duration", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=200, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["load"]["requests"] > 0
    assert result["load"]["errors"] == 0
    rows = result["threads"]
    # A single node leads; its event loop serves the requests and runs the Raft ticks.
    assert {row["process"] for row in rows} == {"node-1 leader"}
    by_thread = {row["thread"]: row for row in rows}
    assert by_thread["MainThread"]["us_per_request"] > 0
    assert len(rows) >= 2  # the audit segment writer worked too (named only with py-spy)
    for row in rows:
        assert row["us_per_request"] == pytest.approx(
            row["user_us_per_request"] + row["system_us_per_request"])
    assert result["total_us_per_request"] == pytest.approx(
        sum(row["us_per_request"] for row in rows))
    assert "total" in done.stdout
