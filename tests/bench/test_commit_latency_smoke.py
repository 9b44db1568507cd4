"""Smoke test of bench/commit_latency.py: a single node loaded for a second, and what its
audit commits report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bench.test_bench_smoke import REPO, _ensure_wrk

COMMIT_LATENCY = os.path.join(REPO, "bench", "commit_latency.py")


@pytest.mark.timeout(240)
def test_commit_latency_reports_the_batches_the_load_committed(tmp_path) -> None:
    _ensure_wrk()
    out = tmp_path / "commit-latency.json"
    done = subprocess.run(
        [sys.executable, COMMIT_LATENCY, "--nodes", "1", "--concurrency", "4,8",
         "--duration", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=200, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [level["concurrency"] for level in result["levels"]] == [4, 8]
    for level in result["levels"]:
        assert level["requests"] > 0
        assert level["errors"] == 0
        [row] = level["nodes"]
        assert row["role"] == "leader"
        # Every answered Decrypt was audited: the batches hold at least the load's requests
        # (the metrics are read a moment before and after wrk runs).
        assert 0 < row["batches"] <= row["records"]
        assert row["records"] >= level["requests"]
        assert row["records_per_batch"] == pytest.approx(row["records"] / row["batches"])
        assert row["commit_mean_ms"] > 0
        assert row["commit_p90_at_most_ms"] > 0
        assert row["entries_per_s"] > 0
        assert row["loop_lag_mean_ms"] is not None and row["loop_lag_mean_ms"] >= 0
    assert "c=8:" in done.stdout and "leader" in done.stdout
