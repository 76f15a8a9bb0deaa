#!/usr/bin/env bash
# Create, launch, watch and stop an ip2p_jax training run on a Cloud TPU pod slice.
# Every host runs the same command; jax.distributed.initialize() (config.distributed)
# discovers the pod from the TPU metadata, and each host feeds its own data shard.
#
#   TPU=ip2p-pod ZONE=us-central2-b TYPE=v4-64 ./scripts/tpu_pod.sh create
#   TPU=ip2p-pod ZONE=us-central2-b ./scripts/tpu_pod.sh launch configs/sd15_ip2p_tpu_pod.py gs://bucket/run1
#   TPU=ip2p-pod ZONE=us-central2-b ./scripts/tpu_pod.sh logs
#   TPU=ip2p-pod ZONE=us-central2-b ./scripts/tpu_pod.sh stop     # SIGTERM: checkpoint, then exit
#   TPU=ip2p-pod ZONE=us-central2-b ./scripts/tpu_pod.sh delete
#
# Preemptible/spot slices: rerun `launch` with the same WORKDIR after a preemption; the
# run resumes from its last checkpoint (the SIGTERM handler saves one on the way out).
set -euo pipefail
: "${TPU:?set TPU to the pod name}" "${ZONE:?set ZONE}"
TYPE="${TYPE:-v4-32}"
VERSION="${VERSION:-tpu-ubuntu2204-base}"
REPO="${REPO:-https://github.com/your-org/ip2p_jax.git}"
gc() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }
on_all() { gc ssh "$TPU" --worker=all --command "$1"; }

case "${1:-}" in
  create)
    gc create "$TPU" --accelerator-type "$TYPE" --version "$VERSION" ${SPOT:+--spot}
    on_all "git clone $REPO ip2p_jax || (cd ip2p_jax && git pull); cd ip2p_jax && \
      python3 -m venv .venv && . .venv/bin/activate && pip install -e . 'jax[tpu]'"
    ;;
  launch)
    config="${2:?config file}"; workdir="${3:?workdir (gs:// or a shared path)}"; shift 3
    on_all "cd ip2p_jax && . .venv/bin/activate && nohup python scripts/train.py \
      --config=$config --workdir=$workdir --config.distributed=True $* > train.log 2>&1 &"
    ;;
  logs) gc ssh "$TPU" --worker=0 --command "tail -n 50 -f ip2p_jax/train.log" ;;
  stop) on_all "pkill -TERM -f scripts/train.py || true" ;;
  delete) gc delete "$TPU" --quiet ;;
  *) echo "usage: $0 create|launch CONFIG WORKDIR [--config.KEY=V ...]|logs|stop|delete"; exit 2 ;;
esac
