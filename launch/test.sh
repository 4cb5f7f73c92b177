#!/usr/bin/env bash
# The test command: sets the machine up (launch/setup.sh), then runs the whole suite on 2 workers.
# Usage: bash launch/test.sh [pytest args...]
#   PYTHON=python3.12 VENV=.venv-py312 bash launch/test.sh   # the suite on another interpreter's venv
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV=${VENV:-.venv}
bash launch/setup.sh
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" --durations=15 "$@"
