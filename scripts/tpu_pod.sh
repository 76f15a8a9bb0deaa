#!/usr/bin/env bash
# Create, launch, watch and stop an ip2p_jax training run on a Cloud TPU pod slice.
# Every host runs the same command; jax.distributed.initialize() (config.distributed)
# discovers the pod from the TPU metadata, and each host feeds its own data shard.
#
# `create` makes the slice and copies this checkout (the folder this script is in) to every
# host, then installs it with the gs:// extras; nothing but gcloud and a bucket you own is
# named. The workdir is a bucket path shared by all hosts; the SD folder, the dataset and
# a latent cache may be in the bucket too (safetensors are read in place by byte ranges;
# ArrayRecord files are copied once per host to $IP2P_JAX_STAGING, default under /tmp).
#
#   TPU=ip2p-pod ZONE=us-west4-a TYPE=v5litepod-64 ./scripts/tpu_pod.sh create
#   TPU=ip2p-pod ZONE=us-west4-a ./scripts/tpu_pod.sh launch configs/sd15_ip2p_tpu_pod.py \
#       gs://YOUR_BUCKET/ip2p --config.model.init_from=gs://YOUR_BUCKET/sd15 \
#       --config.data.path=gs://YOUR_BUCKET/ip2p_data
#   TPU=ip2p-pod ZONE=us-west4-a ./scripts/tpu_pod.sh logs
#   TPU=ip2p-pod ZONE=us-west4-a ./scripts/tpu_pod.sh stop     # SIGTERM: checkpoint, then exit
#   TPU=ip2p-pod ZONE=us-west4-a ./scripts/tpu_pod.sh delete
#
# Preemptible/spot slices (SPOT=1 at create): on a preemption notice all hosts agree on
# one step (JAX's preemption sync point), save it together and exit; rerun `launch` with
# the same WORKDIR and the run resumes from that checkpoint.
set -euo pipefail
: "${TPU:?set TPU to the pod name}" "${ZONE:?set ZONE}"
TYPE="${TYPE:-v5litepod-64}"
VERSION="${VERSION:-v2-alpha-tpuv5-lite}"
HERE="$(cd "$(dirname "$0")/.." && pwd)"
gc() { gcloud compute tpus tpu-vm "$@" --zone "$ZONE"; }
on_all() { gc ssh "$TPU" --worker=all --command "$1"; }

case "${1:-}" in
  create)
    gc create "$TPU" --accelerator-type "$TYPE" --version "$VERSION" ${SPOT:+--spot}
    tar -C "$HERE" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/ip2p_jax.tgz .
    gc scp /tmp/ip2p_jax.tgz "$TPU":ip2p_jax.tgz --worker=all
    on_all "mkdir -p ip2p_jax && tar -C ip2p_jax -xzf ip2p_jax.tgz && cd ip2p_jax && \
      python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[gcs]' 'jax[tpu]'"
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
