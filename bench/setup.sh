#!/usr/bin/env bash
# Installs what the benchmarks need on a Debian machine: wrk (the load generator),
# SoftHSM2, and the `bench` extra (moto[server], matplotlib) plus py-spy into .venv.
# Idempotent: re-running it on a ready machine only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
if ((${#need_apt[@]})); then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import moto, matplotlib, kmsd" >/dev/null 2>&1; then
    .venv/bin/pip install -q -e ".[test,bench]"
fi
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('py_spy') is None)" \
    >/dev/null 2>&1 || [ -x .venv/bin/py-spy ] || .venv/bin/pip install -q py-spy
echo "bench setup ok: $(wrk -v 2>&1 | head -1)"
