"""Smoke test of `bench/failover_decrypt.py`: one short round against a real 3-node cluster,
and the shape of the time series it writes (the kill, the new leader, successes on both sides)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "failover_decrypt.py")


@pytest.mark.timeout(300)
def test_one_round_records_the_dip_and_the_recovery(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--rounds", "1", "--workers", "4", "--before", "3",
         "--after", "4", "--rest", "1", "--port", "27960", "--out-dir", str(tmp_path),
         "--no-plot"], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    [name] = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    with open(tmp_path / name) as handle:
        report = json.load(handle)
    [round_] = report["rounds"]
    marks = round_["marks_s"]
    assert marks["kill"] < marks["new_leader"] < marks["restart"] < marks["restarted_ready"]
    series = round_["series"]
    assert all(b["t"] < a["t"] for b, a in itertools.pairwise(series))
    before = sum(r["ok_per_s"] for r in series if r["t"] < marks["kill"])
    after = sum(r["ok_per_s"] for r in series if r["t"] > marks["new_leader"] + 1)
    assert before > 0 and after > 0
    assert round_["back_to_half_baseline_s"] is not None
    assert (tmp_path / name.replace(".json", ".md")).exists()
