#!/usr/bin/env bash
# Trains the default model (configs/default_model.py) on this machine, stage by stage,
# installs it in ip2p_jax/assets (fp16 safetensors) and evaluates it:
#   default_model/  the InstructPix2Pix editor (diffusers format)
#   default_t2i/    its stage-1 text-to-image UNet (shares the editor's VAE and text encoder)
#   default_clip/   the CLIP (text + vision) of `ip2p eval`'s CLIP metrics
# then runs the stage-1 ablation (stage 2 from a random UNet) and plots both learning
# curves. Every stage resumes: rerunning continues where it stopped. To train stage 2
# longer, raise its length (it resumes from its last checkpoint):
#   IP2P_STEPS=8000 ./scripts/train_default_model.sh
# Extra arguments (--config.KEY=V) apply to every stage; SKIP_ABLATION=1 skips the ablation.
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
train vae_decoder "$@"
train clip "$@"
[ -f "$RUNS/latents/train.arrayrecord" ] || python scripts/build_latent_cache.py
train t2i "$@"
train ip2p ${IP2P_STEPS:+--config.total_steps=$IP2P_STEPS} "$@"
python scripts/install_default_model.py --runs "$RUNS"
python -m ip2p_jax.cli eval --num 200 --out "$RUNS/eval"
if [ -z "${SKIP_ABLATION:-}" ]; then
  train scratch "$@"
  python scripts/plot_learning_curves.py --runs "$RUNS"
fi
