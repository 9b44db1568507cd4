"""Smoke test of bench/ab_decrypt.py: two copies of this tree, one node each, measured in
turn for a round, and the JSON it writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.bench.test_bench_smoke import REPO, _ensure_wrk

AB_DECRYPT = os.path.join(REPO, "bench", "ab_decrypt.py")


@pytest.mark.timeout(300)
def test_ab_decrypt_measures_each_tree_in_every_round(tmp_path) -> None:
    _ensure_wrk()
    copy = tmp_path / "copy"
    shutil.copytree(os.path.join(REPO, "kmsd"), copy / "kmsd")
    shutil.copytree(os.path.join(REPO, "cluster"), copy / "cluster")
    # The copy's kmsd must be the one its node runs, not the installed one: importing it
    # leaves a mark beside it.
    marker = copy / "imported"
    with open(copy / "kmsd" / "__init__.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'a').close()\n")
    out_dir = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, AB_DECRYPT, "--tree", f"here={REPO}", "--tree", f"copy={copy}",
         "--nodes", "1", "--levels", "2,4", "--rounds", "2", "--duration", "1",
         "--pause", "0", "--out-dir", str(out_dir)],
        capture_output=True, text=True, timeout=280, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [name] = os.listdir(out_dir)
    assert re.fullmatch(r"ab-decrypt-\d{4}-\d\d-\d\dT\d{4}-n1-w0\.json", name), name
    with open(out_dir / name) as handle:
        result = json.load(handle)

    assert marker.exists()
    assert result["settings"]["trees"] == {"here": REPO, "copy": str(copy)}
    assert [(r["round"], r["concurrency"]) for r in result["rounds"]] == [
        (0, 2), (0, 4), (1, 2), (1, 4)]
    # The order rotates: each tree goes first in one of the two rounds.
    assert [r["order"][0] for r in result["rounds"]] == ["here", "here", "copy", "copy"]
    for row in result["rounds"]:
        for tree in ("here", "copy"):
            figures = row["trees"][tree]
            assert figures["rps"] > 0 and figures["errors"] == 0
            assert 0 < figures["p50_ms"] <= figures["p99_ms"]
            assert figures["cpu_us_per_request"] > 0
    for level in ("c2", "c4"):
        entry = result["summary"][level]
        assert entry["rounds"] == 2
        assert 0 <= entry["copy_faster_rounds"] <= 2
        assert set(entry["median"]) == {"here", "copy"}
