#!/usr/bin/env bash
# Runs a local 3-node kmsd cluster with SoftHSM2 tokens and prints one JSON line:
# region, account id, endpoints, admin endpoints, pids and dev credentials.
# Any `kmsd dev` flag may follow (see `.venv/bin/kmsd dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kmsd dev "$@"
