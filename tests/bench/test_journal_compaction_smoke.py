"""Smoke test of `bench/journal_compaction.py`: a small journal, one repeat, and the shape
of the JSON it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "bench", "journal_compaction.py")


def test_journal_compaction_reports_both_journals(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, SCRIPT, "--entries", "40", "--entry-bytes", "500,2000",
         "--repeats", "2", "--out-dir", str(tmp_path), "--no-plot"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [name] = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    with open(tmp_path / name) as handle:
        report = json.load(handle)

    assert report["machine"]["cores"] >= 1
    assert report["versions"]["pysyncobj"]
    rows = report["results"]
    assert {(row["journal"].split()[0], row["entry_bytes"]) for row in rows} == {
        ("kmsd", 500), ("kmsd", 2000), ("pysyncobj", 500), ("pysyncobj", 2000)}
    for row in rows:
        assert row["entries"] == 40
        assert len(row["runs"]) == 2
        assert row["compaction_ms"] > 0
        assert row["longest_gap_ms"] > 0
