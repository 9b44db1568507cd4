#!/usr/bin/env bash
# Installs what kmsd needs on a fresh Debian machine: SoftHSM2 (Debian's softhsm2)
# and the kmsd package with its pinned dependencies in ./.venv.
# Usage: scripts/setup.sh [EXTRA]   (EXTRA: "test" for the test dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v softhsm2-util >/dev/null 2>&1; then
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
fi
# wrk (Debian) drives the benchmark smoke test in tests/bench/.
if [ "${1:-}" = test ] && ! command -v wrk >/dev/null 2>&1; then
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
# systemd-analyze (Debian's systemd) verifies ops/systemd/ in tests/unit/test_ops_files.py.
if [ "${1:-}" = test ] && ! command -v systemd-analyze >/dev/null 2>&1; then
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
# promtool and prometheus (Debian's prometheus package) check ops/prometheus/ and evaluate the
# Grafana dashboard's queries. Unpacked into .venv/bin rather than installed: installing the
# package would enable a Prometheus server on the machine.
if [ "${1:-}" = test ] && ! command -v promtool >/dev/null 2>&1 \
    && [ ! -x .venv/bin/promtool ]; then
  sudo_if_needed apt-get update -qq
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && apt-get download -qq prometheus >/dev/null 2>&1)
  dpkg-deb -x "$deb_dir"/prometheus_*.deb "$deb_dir/root"
  install -m 0755 "$deb_dir/root/usr/bin/promtool" "$deb_dir/root/usr/bin/prometheus" .venv/bin/
  rm -rf "$deb_dir"
fi
extra=${1:-}
spec="."
[ -n "$extra" ] && spec=".[$extra]"
log=$(mktemp)
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
