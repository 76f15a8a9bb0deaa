"""The default model shipped with ip2p_jax, trained on the shapes world on a CPU.

Four stages, each initialised from the previous one's export (see
scripts/train_default_model.sh, which runs them in order):

  vae    an autoencoder 64 px -> 16x16x4 latents
  clip   a small CLIP (text + vision) on the shapes captions; its text tower
         conditions the UNet
  t2i    stage 1: text-to-image on captions, VAE and text encoder frozen
  ip2p   stage 2: InstructPix2Pix on (input, instruction, edited) triplets,
         conv_in expanded 4 -> 8 from stage 1

  python scripts/train.py --config=configs/default_model.py:vae --workdir=runs/default/vae
"""
from configs import models
from configs.common import base_config

TEXT = {**models.TINY_CLIP_TEXT, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 2, "projection_dim": 64}
VISION = {**models.TINY_CLIP_VISION, "hidden_size": 64, "intermediate_size": 128,
          "image_size": 64, "patch_size": 8, "num_attention_heads": 4, "num_hidden_layers": 2,
          "projection_dim": 64}
VAE = {**models.TINY_VAE, "block_out_channels": [32, 64, 64], "layers_per_block": 1,
       "norm_num_groups": 16, "sample_size": 64,
       "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
UNET = {**models.TINY_UNET, "block_out_channels": [64, 128, 128], "layers_per_block": 1,
        "attention_head_dim": 4, "cross_attention_dim": 64, "norm_num_groups": 16,
        "sample_size": 16,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
RUNS = "runs/default"

STEPS = {"vae": 500, "clip": 500, "t2i": 400, "ip2p": 4000}


def get_config(stage="ip2p"):
  c = base_config()
  c.data.resolution = 64
  c.data.shapes.size = 64
  c.data.shapes.num_train = 12000
  c.data.shapes.num_heldout = 200
  c.data.path = f"{RUNS}/data"
  c.data.worker_count = 0
  c.model.vae = VAE
  c.model.text_encoder = TEXT
  c.model.clip = {"architectures": ["CLIPModel"], "model_type": "clip", "text_config": TEXT,
                  "vision_config": VISION, "projection_dim": 64}
  c.model.unet = {**UNET, "in_channels": 8 if stage == "ip2p" else 4}
  c.batch_size = 16
  c.total_steps = STEPS[stage]
  c.checkpoint_every = 250
  c.log_every = 50
  c.sample_every = 600
  c.num_samples = 6
  c.sample_steps = 20
  c.ema_decay = 0.999
  c.warmup_steps = 100
  if stage == "vae":
    c.stage, c.learning_rate = "vae", 1e-3
  elif stage == "clip":
    c.stage, c.learning_rate, c.batch_size = "clip", 1e-3, 32
  elif stage == "t2i":
    c.stage, c.learning_rate = "text_to_image", 5e-4
    c.model.vae_from = f"{RUNS}/vae/export/vae"
    c.model.text_encoder_from = f"{RUNS}/clip/export/text_encoder"
  elif stage == "ip2p":
    c.stage, c.learning_rate = "instruct_pix2pix", 5e-4
    c.model.init_from = f"{RUNS}/t2i/export"
  else:
    raise ValueError(f"stage must be one of {sorted(STEPS)}, got {stage!r}")
  return c
