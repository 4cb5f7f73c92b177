#!/usr/bin/env bash
# Trains on a Cloud TPU pod slice: copies this checkout to every worker, installs it with the TPU extra, and
# starts e2etts-train on all workers at once (JAX finds the coordinator on TPU VMs by itself).
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a PROJECT=my-proj \
#     bash launch/tpu_pod.sh --config configs/base.py --workdir gs://my-bucket/runs/base \
#       --config.data.shards=gs://my-bucket/shards
# Data shards and workdir should live on a bucket (or a disk every worker mounts at the same path).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-e2etts_jax}
GCLOUD="gcloud compute tpus tpu-vm"
ARGS=$(printf '%q ' "$@")

git archive --format=tar.gz -o /tmp/e2etts_jax.tgz HEAD
$GCLOUD scp /tmp/e2etts_jax.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" $PROJECT_FLAG --worker=all
$GCLOUD ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf /tmp/e2etts_jax.tgz -C ~/$REMOTE_DIR && cd ~/$REMOTE_DIR &&
  EXTRAS=tpu bash launch/setup.sh &&
  .venv/bin/e2etts-train --distributed=on $ARGS"
