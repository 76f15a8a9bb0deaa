#!/usr/bin/env bash
# Trains the default model (configs/default_model.py) on this machine, stage by stage, and
# installs it in ip2p_jax/assets (fp16 safetensors):
#   default_model/  the InstructPix2Pix editor (diffusers format)
#   default_t2i/    its stage-1 text-to-image UNet (shares the editor's VAE and text encoder)
#   default_clip/   the CLIP (text + vision) used by `ip2p eval`'s CLIP metrics
# Every stage resumes: rerunning continues where it stopped; raise a stage's length with
# e.g. IP2P_STEPS=12000 (stage 2 then resumes from its last checkpoint).
#   ./scripts/train_default_model.sh [--config.KEY=V ...]   (overrides apply to every stage)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=runs/default
train() {  # stage, extra flags...
  local stage=$1; shift
  python scripts/train.py --config="configs/default_model.py:$stage" --workdir="$RUNS/$stage" "$@"
}
[ -d "$RUNS/data/shapes_world" ] ||
  python -m ip2p_jax.cli data shapes --out "$RUNS/data" --num 12000 --heldout 256 --size 128
train vae "$@"
train clip "$@"
[ -f "$RUNS/latents/train.arrayrecord" ] || python scripts/build_latent_cache.py
train t2i "$@"
train ip2p ${IP2P_STEPS:+--config.total_steps=$IP2P_STEPS} "$@"
[ -n "${SKIP_ABLATION:-}" ] || train scratch "$@"
python scripts/install_default_model.py
python -m ip2p_jax.cli eval --out "$RUNS/eval"
