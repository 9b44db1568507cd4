#!/usr/bin/env bash
# Runs the whole test suite (unit and integration: real nodes, SoftHSM2 tokens, boto3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
exec .venv/bin/pytest -p no:cacheprovider --durations=15 "$@"
