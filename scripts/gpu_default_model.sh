#!/usr/bin/env bash
# One lease of a GPU, time-boxed: the GPU benchmarks of the performance issue, then the
# default model's stage 2 trained at GPU batch sizes (configs/default_model_gpu.py),
# exported, packed and evaluated with `ip2p eval`.
#
#   BUDGET=545 OUT=runs/gpu/out ./scripts/gpu_default_model.sh
#   BUDGET=420 NUM=256 EVAL_NUM=8 SKIP_BENCH=1 \
#     TRAIN_FLAGS='--config.batch_size=8 --config.eval_every=4' ./scripts/gpu_default_model.sh  # dry run
#
# Timeline (seconds from the start; BUDGET is the whole script's):
#   1. the shapes data (NUM triplets, a process pool on the CPU), beside it the two GPU
#      benchmarks (edit at SD 1.5 size, batch 8; train step at SD 1.5 size, batch 8),
#      compiling side by side; their timed sections take turns on a lock file, and so
#      does the latent cache, which is built on the GPU once the data is there;
#   2. the benchmarks end by themselves or are stopped at BENCH_UNTIL;
#   3. the STAGES (default `cont`, the bundled UNet continued, and `wide_scratch`, a
#      UNet twice its size from random; `scratch f4` compares the latent grids, f4's
#      VAE trained first if it was not carried) train side by side until BUDGET - FINISH, each
#      stopped by SIGTERM (the loop saves and exits), exported, their UNets packed in
#      fp16 into OUT;
#   4. `ip2p eval` of each export if 90 s or more are left (else the packed UNets are
#      evaluated off the GPU: `ip2p eval --model` of the bundled model's folder with the
#      UNet replaced, and for f4 the VAE too, packed beside it as unets/f4_vae).
# Every phase has its own time limit and the timeline and logs are copied into OUT as
# they come, so a run stopped from outside still returns what it did.
#
# On the lent accelerator (wheels in an ignored .whl/, see BENCHMARKS.md "The GPU path"),
# the one command of a lease (timeout_s 600; carry .whl, built by scripts/gpu_wheels.sh,
# and runs/gpu/vae_f4 where STAGES names f4 and it was trained here; for the finer-grid
# comparison add STAGES="scratch f4" to the env below):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl > $OUT/run.log 2>&1; export PYTHONPATH=/tmp/site:$PWD;
#   mkdir -p /tmp/bin; printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" \
#     > /tmp/bin/python; chmod +x /tmp/bin/python; export PATH=/tmp/bin:$PATH;
#   timeout -s TERM -k 5 565 env BUDGET=545 BENCH_UNTIL=240 OUT=$OUT \
#     ./scripts/gpu_default_model.sh >> $OUT/run.log 2>&1;
#   pkill -9 -f '[s]cripts/train\.py'; pkill -9 -f '[b]enchmarks/gpu_'; pkill -9 -f '[i]p2p_jax\.cli';
#   pkill -9 -f '[b]uild_latent'
#   tail -c 11000 $OUT/run.log
# Output goes to a file, not the tool's stdout (background jobs holding it open would keep
# the call waiting); the bracketed patterns keep pkill from matching the command's own
# shell, whose command line holds the plain words.
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-545}
BENCH_UNTIL=${BENCH_UNTIL:-250}
FINISH=${FINISH:-100}         # seconds kept after training: SIGTERM's save, export, pack
NUM=${NUM:-32000}             # training triplets (smaller for a dry run on a CPU)
EVAL_NUM=${EVAL_NUM:-200}
TRAIN_FLAGS=${TRAIN_FLAGS:-}  # extra --config.KEY=V for every run (a dry run's small batch)
OUT=${OUT:-runs/gpu/out}
RUNS=runs/gpu
TRAIN_CFG=configs/default_model_gpu.py
STAGES=${STAGES:-"cont wide_scratch"}
VAE_F4_FLAGS=${VAE_F4_FLAGS:-}  # extra --config.KEY=V for vae_f4 when trained here
mkdir -p "$OUT" "$RUNS/logs"
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(now)s] $*" | tee -a "$RUNS/logs/timeline.txt" "$OUT/timeline.txt"; }
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
export IP2P_DEVICE_LOCK="$RUNS/device.lock"

last_step() { ls "$RUNS/$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1; }
timed_train() {  # stage, seconds: train until SIGTERM at the deadline, then export
  local stage=$1 seconds=$2
  log "train $stage for ${seconds}s"
  # timeout signals python itself: the loop saves at the next step and exits
  timeout -s TERM -k 30 "$seconds" python scripts/train.py --config="$TRAIN_CFG:$stage" \
    --workdir="$RUNS/$stage" $TRAIN_FLAGS >>"$RUNS/logs/$stage.log" 2>&1
  local step; step=$(last_step "$stage")
  log "$stage stopped at step ${step:-none}; exporting"
  [ -n "$step" ] && timeout 50 python scripts/train.py --config="$TRAIN_CFG:$stage" \
    --workdir="$RUNS/$stage" $TRAIN_FLAGS --config.total_steps="$step" --config.eval_every=0 \
    >>"$RUNS/logs/$stage.log" 2>&1
  log "$stage exported: $(ls "$RUNS/$stage/export" 2>/dev/null | tr '\n' ' ')"
}

log "start (budget ${BUDGET}s)"
log "gpu: $(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
log "devices: $(timeout 120 python -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
log "$(timeout 60 python -c 'import jax, flax, optax, orbax.checkpoint, grain, torch; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)' 2>&1 | tail -1)"

# 1. Shapes data on the CPU; the GPU benchmarks beside it, the latent cache after it.
log "data"
timeout 240 python -m ip2p_jax.cli data shapes --out "$RUNS/data" --num "$NUM" --heldout 256 \
  --size 128 >"$RUNS/logs/data.log" 2>&1 &
DATA=$!
BENCHES=()
if [ -z "${SKIP_BENCH:-}" ]; then
  python benchmarks/gpu_edit_sd15.py --batch 8 --steps 20 --repeats 2 \
    >"$OUT/bench_edit.txt" 2>&1 &
  BENCHES+=($!)
  python benchmarks/gpu_train_sd15.py --batch 8 --steps 10 \
    >"$OUT/bench_train.txt" 2>&1 &
  BENCHES+=($!)
fi
wait $DATA; log "data done (rc $?)"
LOCKED=""; command -v flock >/dev/null && LOCKED="flock -w 60 $IP2P_DEVICE_LOCK"
# One cache per latent grid the STAGES read (32,000 triplets: 1.3 GB at 8x, 3.3 GB at 4x). f4's VAE (runs/gpu/vae_f4) is carried when
# trained beforehand (configs/default_model.py:vae_f4, 21 min on the 2-core CPU), else
# trained here first, time-boxed (VAE_F4_SECONDS).
CACHES="cont"
case " $STAGES " in *" f4 "*)
  CACHES="cont f4"
  if [ ! -f "$RUNS/vae_f4/config.json" ]; then
    log "train vae_f4 for ${VAE_F4_SECONDS:=150}s"
    timeout -s TERM -k 20 "$VAE_F4_SECONDS" python scripts/train.py \
      --config=configs/default_model.py:vae_f4 --workdir="$RUNS/vae_f4_run" \
      --config.data.path="$RUNS/data" $VAE_F4_FLAGS >"$RUNS/logs/vae_f4.log" 2>&1
    step=$(last_step vae_f4_run)
    [ -n "$step" ] && timeout 60 python scripts/train.py --config=configs/default_model.py:vae_f4 \
      --workdir="$RUNS/vae_f4_run" --config.data.path="$RUNS/data" $VAE_F4_FLAGS \
      --config.total_steps="$step" >>"$RUNS/logs/vae_f4.log" 2>&1 \
      && cp -r "$RUNS/vae_f4_run/export/vae" "$RUNS/vae_f4"
    log "vae_f4 stopped at step ${step:-none}: $(ls "$RUNS/vae_f4" 2>/dev/null | tr '\n' ' ')"
  fi;;
esac
for cache in $CACHES; do
  $LOCKED timeout 240 python scripts/build_latent_cache.py \
    --config "$TRAIN_CFG:$cache" --batch-size 256 >"$RUNS/logs/cache_$cache.log" 2>&1
  log "latent cache $cache done (rc $?)"
done

# 2. The benchmarks' end (theirs or BENCH_UNTIL's).
for pid in "${BENCHES[@]}"; do
  while kill -0 "$pid" 2>/dev/null && [ "$(now)" -lt "$BENCH_UNTIL" ]; do sleep 2; done
done
for pid in "${BENCHES[@]}"; do kill "$pid" 2>/dev/null; done
wait "${BENCHES[@]}" 2>/dev/null
log "benchmarks ended"

# 3. Two runs side by side until the training deadline; export; pack the UNets.
WINDOW=$(( BUDGET - $(now) - FINISH ))
log "training window ${WINDOW}s"
if [ "$WINDOW" -gt 60 ]; then
  PIDS=()
  for stage in $STAGES; do timed_train "$stage" "$WINDOW" & PIDS+=($!); done
  wait "${PIDS[@]}"
  timeout 30 python - "$RUNS" "$OUT" $STAGES <<'EOF' 2>&1 | tee -a "$RUNS/logs/timeline.txt"
import json, os, sys, numpy as np
from ip2p_jax.bundled import DEFAULT_MODEL
from ip2p_jax.checkpoints import load_component, save_component
runs, out, *stages = sys.argv[1:]
config = lambda folder: json.load(open(os.path.join(folder, "config.json")))
for run in stages:
  unet = os.path.join(runs, run, "export", "unet")
  if os.path.isdir(unet):
    module, params = load_component(unet)
    save_component(os.path.join(runs, "unets", run), module, params, dtype=np.float16)
    print("fp16 unet", run)
    vae = os.path.join(runs, run, "export", "vae")  # f4's: not the bundled editor's VAE
    if config(vae) != config(os.path.join(DEFAULT_MODEL, "vae")):
      module, params = load_component(vae)
      save_component(os.path.join(runs, "unets", f"{run}_vae"), module, params)
      print("vae", run)
EOF
  tar cf - -C "$RUNS" unets | split -b 15m -a 1 - "$OUT/unets.tar.part-"
  tar czf "$OUT/results.tgz" "$RUNS/logs" "$RUNS"/*/metrics.jsonl 2>/dev/null
  log "packed the UNets and training logs"
else
  log "no time left to train"
fi

# 4. ip2p eval of every export, side by side, with the time left.
for stage in $STAGES; do
  [ -f "$RUNS/$stage/export/model_index.json" ] && [ $(( BUDGET - $(now) )) -ge 90 ] || continue
  timeout $(( BUDGET - $(now) - 10 )) python -m ip2p_jax.cli eval \
    --model "$RUNS/$stage/export" --num "$EVAL_NUM" --out "$RUNS/$stage/eval" \
    >"$RUNS/logs/eval_$stage.log" 2>&1 &
done
wait
log "evals done"
for stage in $STAGES; do
  [ -f "$RUNS/$stage/eval/eval.json" ] && log "$stage: $(python -c "
import json; r = json.load(open('$RUNS/$stage/eval/eval.json')); o = r['overall']
f = lambda v: 'n/a' if v is None else '%.3f' % v
print('all', f(o['success']), 'psnr', f(o['psnr']), 'outside', f(o['psnr_outside']),
      'held-out', f(r['held_out_edit']['success']), '|',
      ' '.join(k + ' ' + f(v['success']) for k, v in r['per_edit_type'].items()))")"
done
tar czf "$RUNS/results.tgz" "$RUNS/logs" "$RUNS"/*/metrics.jsonl "$RUNS"/*/eval 2>/dev/null \
  && mv "$RUNS/results.tgz" "$OUT/results.tgz"
log "done: $(ls -la "$OUT" | tail -n +2 | awk '{print $5, $9}' | tr '\n' ' ')"
