"""The default model's diffusion stages at accelerator scale: one GPU for minutes instead
of this CPU for hours (``scripts/gpu_default_model.sh`` runs them, time-boxed, and
evaluates each with ``ip2p eval``). Same data, VAE, text encoder and schedule as
``configs/default_model.py``; the encoders come from the bundled model, so nothing
but this repository travels to the accelerator.

  cont          stage 2 continued from the bundled editor (its UNet), 8x the CPU batch
  cont_big      the same at 32x the CPU batch (1024) and twice the learning rate: whether a
                GPU that the small UNet leaves idle at 256 turns a bigger batch into progress
  wide_t2i      stage 1 for a bigger UNet (about 2x the parameters): 96 channels at 16x16,
                cross-attention at every level (16x16, 8x8 and 4x4) and two layers per
                block, from random
  wide          stage 2 for that UNet, initialised from ``wide_t2i``'s export
  wide_scratch  the same stage 2 from a random UNet: the stage-1 ablation at this scale
  scratch       stage 2 of the bundled UNet's architecture from random (16x16 latents)
  f4            the same from random on the finer latent grid: ``default_model.VAE_F4``
                (32x32 latents, its folder in runs/gpu/vae_f4, trained on the CPU by
                ``configs/default_model.py:vae_f4``) and ``default_model.UNET_F4``; run
                beside ``scratch`` (``STAGES="scratch f4"``) it measures the grid alone

  python scripts/train.py --config=configs/default_model_gpu.py:cont --workdir=runs/gpu/cont
"""
from configs import default_model
from ip2p_jax.bundled import DEFAULT_MODEL as BUNDLED
RUNS = "runs/gpu"
LATENTS = f"{RUNS}/latents/train.arrayrecord"
WIDE_UNET = {**default_model.UNET, "block_out_channels": [96, 128, 128],
             "layers_per_block": 2, "attention_head_dim": 8,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3,
             "up_block_types": ["CrossAttnUpBlock2D"] * 3}
STAGES = ("cont", "cont_big", "wide_t2i", "wide", "wide_scratch", "scratch", "f4")


def get_config(stage="cont"):
  if stage not in STAGES:
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
  c = default_model.get_config("t2i" if stage == "wide_t2i" else "ip2p")
  c.model.init_from = ""
  c.model.vae_from = f"{BUNDLED}/vae"
  c.model.text_encoder_from = f"{BUNDLED}/text_encoder"
  c.model.tokenizer_from = f"{BUNDLED}/tokenizer"
  c.data.path = f"{RUNS}/data"  # built there by the script (same seed: the same triplets)
  c.data.latents = LATENTS
  # The wide stages keep default_model's learning rate and warm-up (3e-4, 100 steps);
  # cont and cont_big set their own below.
  c.batch_size = 256
  # Runs are stopped by the clock (SIGTERM saves), so the length is only an upper bound.
  c.total_steps = 100_000
  # A run stopped by the clock saves on SIGTERM at its next step, but one killed first
  # (on the 2026-11-28 lease `wide_scratch` was, inside its first in-training evaluation)
  # keeps only its last checkpoint: keep one often (a few hundred ms each at this size).
  c.checkpoint_every = 250
  c.log_every = 100
  c.sample_every = 0
  c.num_samples = 0
  c.eval_every = 500 if stage != "wide_t2i" else 0
  c.eval_num = 64
  c.eval_batch_size = 64
  latent = default_model.VAE["latent_channels"]
  if stage in ("cont", "cont_big"):
    c.model.init_from = BUNDLED  # its UNet; the encoders are the same folders
    c.learning_rate = 2e-4
    c.warmup_steps = 50
  else:
    c.model.unet = {**WIDE_UNET, "in_channels": latent if stage == "wide_t2i" else 2 * latent,
                    "out_channels": latent}
  if stage == "cont_big":
    c.batch_size = 1024
    c.learning_rate = 4e-4
    c.eval_every = 200  # 200 x 1024 examples: about cont's 500 x 256 between evaluations, x1.6
  if stage == "wide":
    c.model.init_from = f"{RUNS}/wide_t2i/export"
  if stage == "scratch":
    c.model.unet = {**default_model.UNET, "in_channels": 2 * latent, "out_channels": latent}
  if stage == "f4":
    c.model.vae_from = f"{RUNS}/vae_f4"
    c.data.latents = f"{RUNS}/latents_f4/train.arrayrecord"
    latent = default_model.VAE_F4["latent_channels"]
    c.model.unet = {**default_model.UNET_F4, "in_channels": 2 * latent, "out_channels": latent}
  return c
