#!/usr/bin/env bash
# The default model's diffusion stages on one GPU, time-boxed (configs/default_model_gpu.py),
# then `ip2p eval` of every run; the GPU benchmarks run beside the CPU-bound data build.
#
#   BUDGET=540 OUT=runs/gpu/out ./scripts/gpu_default_model.sh
#   BUDGET=400 NUM=256 EVAL_NUM=8 SKIP_BENCH=1 \
#     TRAIN_FLAGS='--config.batch_size=8 --config.eval_every=4' ./scripts/gpu_default_model.sh  # dry run
#
# Timeline (seconds from the start, BUDGET the whole script's): shapes data (CPU) with the
# GPU benchmarks beside it; the latent cache; three training runs side by side on the one
# GPU, each stopped by SIGTERM (the loop saves and exits) -- `cont` and `wide_scratch` for
# the whole window, `wide_t2i` for its first third and then `wide` from its export; each
# run exported and evaluated (`ip2p eval --num 200`, the CLI's defaults). Results, logs and
# the UNets of `cont` and `wide` (fp16) are packed into OUT (files of at most 15 MB).
#
# On the lent accelerator (wheels in an ignored .whl/, see BENCHMARKS.md "The GPU path"):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site && mkdir -p /tmp/bin &&
#   printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" >/tmp/bin/python &&
#   chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH &&
#   timeout 560 env BUDGET=500 OUT=$OUT ./scripts/gpu_default_model.sh
#
# Every phase has its own time limit and the timeline is written into OUT as it goes, so
# a run stopped from outside still returns what it did. (The one lease so far, 2026-11-27,
# ran this script once for 600 s and returned no output at all, not even that of the
# `python -c "import jax; print(jax.devices())"` run before it, so most likely JAX's
# first GPU start never returned; the device check at the top now has a time limit.)
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-540}
NUM=${NUM:-12000}            # training triplets (smaller for a dry run on a CPU)
EVAL_NUM=${EVAL_NUM:-200}
TRAIN_FLAGS=${TRAIN_FLAGS:-}  # extra --config.KEY=V for every run (a dry run's small batch)
OUT=${OUT:-runs/gpu/out}
RUNS=runs/gpu
TRAIN_CFG=configs/default_model_gpu.py
mkdir -p "$OUT" "$RUNS/logs"
T0=$(date +%s)
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(now)s] $*" | tee -a "$RUNS/logs/timeline.txt" "$OUT/timeline.txt"; }
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2

last_step() { ls "$RUNS/$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1; }
timed_train() {  # stage, seconds: train until SIGTERM at the deadline, then export
  local stage=$1 seconds=$2
  log "train $stage for ${seconds}s"
  # timeout signals python itself: the loop saves at the next step and exits
  timeout -s TERM -k 60 "$seconds" python scripts/train.py --config="$TRAIN_CFG:$stage" \
    --workdir="$RUNS/$stage" $TRAIN_FLAGS >>"$RUNS/logs/$stage.log" 2>&1
  local step; step=$(last_step "$stage")
  log "$stage stopped at step ${step:-none}; exporting"
  [ -n "$step" ] && timeout 120 python scripts/train.py --config="$TRAIN_CFG:$stage" \
    --workdir="$RUNS/$stage" $TRAIN_FLAGS --config.total_steps="$step" --config.eval_every=0 \
    >>"$RUNS/logs/$stage.log" 2>&1
  log "$stage exported: $(ls "$RUNS/$stage/export" 2>/dev/null | tr '\n' ' ')"
}

log "start"
log "devices: $(timeout 120 python -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
log "$(timeout 60 python -c 'import jax, flax, optax, orbax.checkpoint, grain; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)' 2>&1 | tail -1)"

# 1. Shapes data on the CPU; GPU benchmarks beside it until the latent cache is done.
log "data"
timeout 240 python -m ip2p_jax.cli data shapes --out "$RUNS/data" --num "$NUM" --heldout 256 \
  --size 128 >"$RUNS/logs/data.log" 2>&1 &
DATA=$!
( [ -n "${SKIP_BENCH:-}" ] && exit
  python benchmarks/gpu_edit_sd15.py --batch 1 8 --steps 20 \
    >"$RUNS/logs/bench_edit.txt" 2>&1
  python benchmarks/gpu_train_sd15.py --batch 8 32 --steps 10 \
    >"$RUNS/logs/bench_train.txt" 2>&1 ) &
BENCH=$!
wait $DATA; log "data done (rc $?)"

# 2. Latent cache of the triplets with the bundled VAE and text encoder.
timeout 180 python scripts/build_latent_cache.py --config "$TRAIN_CFG:wide_t2i" --batch-size 256 \
  >"$RUNS/logs/cache.log" 2>&1
log "latent cache done (rc $?)"
kill $BENCH 2>/dev/null; pkill -f "benchmarks/gpu_" ; wait $BENCH 2>/dev/null
log "benchmarks stopped"

# 3. Three runs side by side until the training deadline.
EVAL_TIME=110
WINDOW=$(( BUDGET - $(now) - EVAL_TIME ))
T2I=$(( WINDOW / 3 ))
log "training window ${WINDOW}s"
[ "$WINDOW" -gt 60 ] || { log "no time left to train"; exit 1; }
timed_train cont "$WINDOW" & A=$!
timed_train wide_scratch "$WINDOW" & B=$!
( timed_train wide_t2i "$T2I"
  [ -f "$RUNS/wide_t2i/export/model_index.json" ] &&
    timed_train wide $(( BUDGET - EVAL_TIME - $(now) )) ) & C=$!
wait $A $B $C

# 4. ip2p eval of every exported run, side by side.
for run in cont wide_scratch wide; do
  [ -f "$RUNS/$run/export/model_index.json" ] || continue
  timeout $(( BUDGET - $(now) - 15 )) python -m ip2p_jax.cli eval \
    --model "$RUNS/$run/export" --num "$EVAL_NUM" --out "$RUNS/$run/eval" \
    >"$RUNS/logs/eval_$run.log" 2>&1 &
done
wait
log "evals done"
for run in cont wide_scratch wide; do
  [ -f "$RUNS/$run/eval/eval.json" ] && log "$run: $(python -c "
import json; r = json.load(open('$RUNS/$run/eval/eval.json')); o = r['overall']
f = lambda v: 'n/a' if v is None else '%.3f' % v
print('all', f(o['success']), 'psnr', f(o['psnr']), 'outside', f(o['psnr_outside']),
      'held-out', f(r['held_out_edit']['success']), '|',
      ' '.join(k + ' ' + f(v['success']) for k, v in r['per_edit_type'].items()))")"
done

# 5. Pack: logs, metrics, eval reports and sheets; the UNets in fp16.
timeout 60 python - "$RUNS" "$OUT" <<'EOF' 2>&1 | tee -a "$RUNS/logs/timeline.txt"
import os, sys, numpy as np
from ip2p_jax.checkpoints import load_component, save_component
runs, out = sys.argv[1:]
for run in ("cont", "wide"):  # wide_scratch: its eval numbers only (OUT's 64 MB)
  unet = os.path.join(runs, run, "export", "unet")
  if os.path.isdir(unet):
    module, params = load_component(unet)
    save_component(os.path.join(runs, "unets", run), module, params, dtype=np.float16)
    print("fp16 unet", run)
EOF
tar czf "$RUNS/results.tgz" "$RUNS/logs" "$RUNS"/*/metrics.jsonl "$RUNS"/*/eval 2>/dev/null
cp "$RUNS/results.tgz" "$OUT/"
tar cf - -C "$RUNS" unets | split -b 15m -a 1 - "$OUT/unets.tar.part-"
log "packed: $(ls -la "$OUT" | tail -n +2 | awk '{print $5, $9}' | tr '\n' ' ')"
