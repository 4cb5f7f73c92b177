#!/usr/bin/env bash
# Runs N local processes of e2etts-train on this machine's CPU as one multi-host job over loopback
# (jax.distributed + gloo collectives): the way to try multi-host code without a cluster.
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 bash launch/local.sh --config configs/tiny.py --workdir runs/mh
set -euo pipefail
cd "$(dirname "$0")/.."
NUM=${NUM_PROCESSES:-2}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-.venv/bin/python}
pids=()
for ((i = 0; i < NUM; i++)); do
  E2ETTS_COORDINATOR=127.0.0.1:$PORT E2ETTS_NUM_PROCESSES=$NUM E2ETTS_PROCESS_ID=$i JAX_PLATFORMS=cpu \
  XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1} \
    "$PY" -m e2etts_jax.cli.train --distributed=on "$@" > >(sed "s/^/[process $i] /") 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
