#!/usr/bin/env bash
# Trains the default model (configs/default_model.py) on this machine, stage by stage,
# and installs it as ip2p_jax/assets/default_model (fp16 safetensors). Rerunning resumes.
#   ./scripts/train_default_model.sh [--config.KEY=V ...]   (overrides apply to every stage)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=runs/default
python -m ip2p_jax.cli data shapes --out "$RUNS/data" --num 12000 --heldout 200 --size 64
for stage in vae clip t2i ip2p; do
  python scripts/train.py --config="configs/default_model.py:$stage" --workdir="$RUNS/$stage" "$@"
done
python - <<'PY'
import shutil
from ip2p_jax.checkpoints import load_pipeline, save_pipeline
import numpy as np
parts = load_pipeline("runs/default/ip2p/export")
shutil.rmtree("ip2p_jax/assets/default_model", ignore_errors=True)
save_pipeline("ip2p_jax/assets/default_model", parts, dtype=np.float16)
print("installed ip2p_jax/assets/default_model")
PY
