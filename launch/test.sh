#!/usr/bin/env bash
# The test command: sets the machine up (launch/setup.sh), then runs the whole suite on 2 workers.
# Usage: bash launch/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --durations=15 "$@"
