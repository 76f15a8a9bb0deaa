"""The keys every training config has, with their defaults (see ``scripts/train.py``).

Strict: the returned ``ConfigDict`` is locked, so ``c.totl_steps = 3`` in Python is an
error, as ``--config.not_a_key=1`` on the command line is.
"""
import ml_collections

from configs import models

# Mesh axes (config.mesh; one may be -1: "the devices the others leave"):
#   dcn     across the slices of a multi-slice TPU pod (data-centre network): batch only
#   data    batch, weights replicated (plain data parallelism inside a slice)
#   fsdp    batch and weights: each device holds 1/fsdp of every large weight (ZeRO-3)
#   tensor  model parallelism: attention heads and feed-forward widths split
# data x fsdp x tensor devices per slice, times dcn slices, must equal the device count.
#
# Logical axes (what model code names a parameter's dimensions; ip2p_jax/sharding.py):
#   batch          the examples of a global batch (activations)
#   embed          the model width a layer reads (a Dense kernel's input features)
#   mlp            the width a layer writes (feed-forward, time embedding, proj_in)
#   heads          query/key/value outputs, heads x head_dim
#   kv             cross-attention keys/values' input (the text encoder's width)
#   conv_in        input channels of a convolution kernel
#   conv_out       output channels of a convolution kernel and its bias
#   kernel_height, kernel_width   a convolution kernel's spatial size
#   norm           scale/offset of a normalisation layer
#   vocab          rows of a token-embedding table
#   position       rows of a position-embedding table
#   length         sequence positions (activations)
# A rule maps a logical axis to mesh axes (None: replicated). A dimension its mesh axes
# do not divide, or whose mesh axis another dimension of the same weight already took,
# stays replicated; the run lists every such parameter once at start-up.
FSDP_RULES = [
    ["batch", ["dcn", "data", "fsdp"]], ["embed", "fsdp"], ["mlp", "tensor"], ["heads", "tensor"],
    ["kv", None], ["conv_in", None], ["conv_out", "fsdp"], ["kernel_height", None],
    ["kernel_width", None],
    ["norm", None], ["vocab", "tensor"], ["position", None], ["length", None],
]

# The original's scheduler_config.json (timbrooks/instruct-pix2pix). Its DDIM/PNDM keys
# matter when a user switches samplers: without "clip_sample": false, diffusers' (and so
# our) DDIM and DDPM take their class default True and clip the predicted latent to
# [-1, 1], which wrecks any latent model's output.
IP2P_SCHEDULER = {"_class_name": "EulerAncestralDiscreteScheduler",
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon",
                  "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False,
                  "set_alpha_to_one": False, "skip_prk_steps": True}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "instruct_pix2pix"  # or "text_to_image", "vae", "clip"
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.unet = models.TINY_IP2P_UNET
  c.model.vae = models.TINY_VAE
  c.model.text_encoder = models.TINY_CLIP_TEXT
  c.model.clip = {"architectures": ["CLIPModel"], "model_type": "clip",
                  "text_config": models.TINY_CLIP_TEXT, "vision_config": models.TINY_CLIP_VISION,
                  "projection_dim": 32}
  c.model.init_from = ""           # pipeline folder (stage-1 export, SD 1.5, ...)
  c.model.vae_from = ""            # component folders for the frozen encoders
  c.model.text_encoder_from = ""
  c.model.tokenizer_from = ""
  c.model.compute_dtype = "float32"  # "bfloat16": bf16 compute, fp32 master weights
  c.model.remat = False
  c.scheduler = IP2P_SCHEDULER

  c.data = ml_collections.ConfigDict()
  c.data.path = ""                 # a built dataset; empty: build the shapes world below
  c.data.split = "train"
  c.data.sample_split = "heldout"
  c.data.resolution = 32
  c.data.worker_count = 0
  c.data.max_resize = 1.0
  c.data.flip = True
  c.data.latents = ""              # a latent cache file (ip2p data cache): skip the encoders
  c.data.shapes = ml_collections.ConfigDict(
      dict(size=32, num_train=64, num_heldout=8, seed=0))

  c.batch_size = 4                 # global, per optimizer step
  c.grad_accum_steps = 1
  c.learning_rate = 1e-4
  c.lr_schedule = "constant"
  c.warmup_steps = 0
  c.weight_decay = 1e-2
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.grad_clip_norm = 1.0
  c.ema_decay = 0.9999
  c.conditioning_dropout = 0.05    # IP2P: 5% text only, 5% both, 5% image only
  c.caption_dropout = 0.1          # stage 1
  c.kl_weight = 1e-6               # VAE
  c.object_weight = 0.0            # stage 2 on a latent cache: loss weight 1 + this on the
                                   # objects' cells (objectives.object_weights)
  c.vae_crop = 0                   # VAE: train on random crops of this size (0: whole images)
  c.vae_train = "all"              # VAE: "all", or "decoder": the encoder (and so the latents,
                                   # the scaling factor and any UNet trained on them) kept
  c.vae_mse_weight = 0.0           # VAE: squared error added to the L1 reconstruction loss
  c.min_snr_gamma = 0.0            # diffusion: Min-SNR-gamma loss weights (0: plain MSE)

  c.total_steps = 4
  c.checkpoint_every = 2
  c.keep_checkpoints = 3
  c.log_every = 1                  # loss/metrics read back (and NaN checked) every N steps
  c.sample_every = 0               # 0: only at the end
  c.num_samples = 4                # examples on each sample sheet (0: no sample sheets)
  c.sample_steps = 10
  c.eval_every = 0                 # held-out shapes-world success every N steps: IP2P edits,
                                   # or text-to-image captions judged by colour
  c.eval_num = 32
  c.eval_steps = 50                # the CLI's default sampling settings
  c.eval_seed = 0
  c.eval_batch_size = 32
  c.export = True

  # Parameter-efficient fine-tuning (ip2p_jax/adapters; ip2p customize): method "" trains
  # the whole model; "custom_diffusion" the cross-attention kernels named by targets
  # (default to_k,to_v) and new tokens; "lora" rank-r adapters on targets (default
  # to_q,to_k,to_v,to_out_0; also ff, conv). Everything else frozen; export writes
  # export/adapter.safetensors. Use ema_decay 0 and eval_every 0 with it.
  c.customize = ml_collections.ConfigDict(dict(
      method="", targets="", rank=4, alpha=4.0,
      tokens="",            # comma-separated new tokens, e.g. "<new1>"
      initializer="",       # the word (or one per token) whose embedding each starts from
      prior_weight=1.0))    # weight of the regularisation examples' loss (ip2p customize --prior)

  c.mesh = ml_collections.ConfigDict(dict(dcn=1, data=-1, fsdp=1, tensor=1))  # see above
  c.logical_axis_rules = FSDP_RULES
  c.device_peak_tflops = 0.0       # 0: look the device up (MFU is omitted if unknown)
  c.distributed = False            # jax.distributed.initialize() from the environment
  # (TPU pods, SLURM); several processes then stop together on preemption (SIGTERM)
  c.lock()  # strict: assigning a key that does not exist is an error
  return c
