#!/usr/bin/env bash
# The main job in one command: set the machine up, then build the embedded corpus, prepare shards, train the
# `small` config through its stages, synthesise and evaluate the held-out sentences, and print a summary table
# (also in runs/quickstart/summary.md and summary.json). Fits in ~30 minutes on 2 CPU cores; re-running resumes
# and reuses the corpus, the shards and the checkpoints.
#
#   bash launch/quickstart.sh                                        # defaults
#   bash launch/quickstart.sh --config.train.stage1.steps=400 --num_utterances=2000 --eval_items=64
#   WORKDIR=runs/qs2 CONFIG=configs/tiny.py bash launch/quickstart.sh   # another run folder / size
#
# Environment: WORKDIR (runs/quickstart), CONFIG (configs/small.py), VENV (.venv), SKIP_SETUP=1 to use an
# already set-up $VENV without running launch/setup.sh. Extra arguments go to e2etts_jax.main_job
# (--config.* overrides, --num_utterances, --eval_items, --corpus_dir, --eval_seed, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

WORKDIR=${WORKDIR:-runs/quickstart}
CONFIG=${CONFIG:-configs/small.py}
export VENV=${VENV:-.venv}

start=$(date +%s)
if [ "${SKIP_SETUP:-0}" != "1" ]; then
  bash launch/setup.sh
fi
echo "[quickstart] setup took $(( $(date +%s) - start )) s"

# Compiled programs persist between runs (a re-run skips the 30-60 s compiles per stage and length bucket).
export E2ETTS_XLA_CACHE=${E2ETTS_XLA_CACHE:-$HOME/.cache/e2etts_jax/xla}
exec "$VENV/bin/python" -m e2etts_jax.main_job --workdir "$WORKDIR" --config "$CONFIG" "$@"
