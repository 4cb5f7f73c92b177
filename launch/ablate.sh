#!/usr/bin/env bash
# The paper's claims as paired A/Bs: trains and scores each variant (e2e, cascaded, recognition_tokenizer) for each
# seed with the main job's pipeline, then renders docs/results.md from every saved results.json. Resumable: a
# finished run is skipped, so re-running after an interruption continues the study.
#
#   bash launch/ablate.sh                                    # configs/small.py, main-job budget, seeds 0,1,2
#   CONFIG=configs/mini.py OUT=runs/ablate-mini bash launch/ablate.sh --seeds=0,1,2,3,4
#   bash launch/ablate.sh --variants=e2e,no_usage --config.train.stage1.steps=300
#   REPORT_ONLY=1 bash launch/ablate.sh                      # re-render docs/results.md only
#
# Environment: CONFIG (configs/small.py), OUT (runs/ablate), MD (docs/results.md), REPORT_FROM (more study folders,
# comma-separated, whose runs also go into the page), VENV (.venv), SKIP_SETUP=1. Extra arguments go to
# e2etts-ablate (--variants, --seeds, --eval_items, --num_utterances, --config.* overrides, ...).
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/small.py}
OUT=${OUT:-runs/ablate}
MD=${MD:-docs/results.md}
export VENV=${VENV:-.venv}
if [ "${SKIP_SETUP:-0}" != "1" ]; then
  bash launch/setup.sh
fi
export E2ETTS_XLA_CACHE=${E2ETTS_XLA_CACHE:-$HOME/.cache/e2etts_jax/xla}
extra=()
if [ "${REPORT_ONLY:-0}" = "1" ]; then
  extra+=(--report_only)
fi
if [ -n "${REPORT_FROM:-}" ]; then
  extra+=(--report_from="$REPORT_FROM")
fi
exec "$VENV/bin/python" -m e2etts_jax.cli.ablate --config "$CONFIG" --out "$OUT" --md "$MD" "${extra[@]}" "$@"
