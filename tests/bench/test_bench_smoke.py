"""Smoke test of the benchmark harness: `bench/decrypt.py --quick` against the two cheapest
targets (the bare aiohttp ceiling and the minimal SigV4 + SoftHSM2 server), 1 s per figure,
and the shape of the JSON it writes."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECRYPT = os.path.join(REPO, "bench", "decrypt.py")


def _ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True,
                       timeout=300, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False,
                       capture_output=True, timeout=300, env=env)
    if not shutil.which("wrk"):
        pytest.skip("wrk is not installed and could not be installed (run bench/setup.sh)")


@pytest.mark.timeout(240)
def test_decrypt_quick_writes_the_expected_json(tmp_path) -> None:
    _ensure_wrk()
    if not shutil.which("softhsm2-util"):
        pytest.skip("SoftHSM2 is not installed (run bench/setup.sh)")
    done = subprocess.run(
        [sys.executable, DECRYPT, "--quick", "--targets", "null,minimal", "--duration", "1",
         "--levels", "1,8", "--op-level", "8", "--ops", "Encrypt", "--out-dir", str(tmp_path),
         "--no-plot"],
        capture_output=True, text=True, timeout=200, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    [path] = glob.glob(str(tmp_path / "decrypt-*.json"))
    assert glob.glob(str(tmp_path / "decrypt-*.md"))
    with open(path) as handle:
        results = json.load(handle)

    for field in ("machine", "versions", "date", "loadavg", "settings", "summary", "ratios",
                  "runs", "issue_targets"):
        assert field in results, field
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["model_name"] is not None
    assert results["machine"]["memory_bytes"] > 0
    for package in ("python", "kmsd", "pysyncobj", "python-pkcs11", "aiohttp", "softhsm"):
        assert results["versions"][package], package

    for target in ("null", "minimal"):
        for level in ("1", "8"):
            figure = results["summary"][target]["Decrypt"][level]
            assert figure["rps"] > 0
            assert figure["errors"] == 0, (target, level, figure)
            assert 0 < figure["p50_ms"] <= figure["p90_ms"] <= figure["p99_ms"] \
                <= figure["max_ms"]
            assert figure["server_cpu_us_per_request"] is not None
            assert figure["wrk_cores"] >= 0
            assert 0 <= figure["wrk_cpu_share"] <= 1
    assert results["summary"]["minimal"]["Encrypt"]["8"]["rps"] > 0
    assert results["ratios"]["minimal/ceiling"]["8"]["median"] > 0
    assert len(results["runs"]) == 2 * 2 + 1
