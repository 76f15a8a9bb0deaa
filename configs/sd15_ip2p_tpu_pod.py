"""InstructPix2Pix at Stable Diffusion 1.5 scale, the paper's recipe, on a TPU pod.

Effective batch 1024 (here: global batch 1024, no accumulation, on >= 64 chips),
lr 1e-4 constant, 10k steps, 256 px, EMA 0.9999, conditioning dropout 5/5/5%,
initialised from SD 1.5 (conv_in expanded 4 -> 8, bias kept). bf16 compute with fp32
master weights, FSDP over all chips.

  TPU=ip2p-pod ZONE=us-west4-a ./scripts/tpu_pod.sh launch configs/sd15_ip2p_tpu_pod.py \
      gs://YOUR_BUCKET/ip2p --config.model.init_from=gs://YOUR_BUCKET/sd15 \
      --config.data.path=gs://YOUR_BUCKET/ip2p_data

(the SD 1.5 folder and a dataset built by `ip2p data import`, in the bucket or at the
same local path on every host). Expected speed on v5e-64 / v5p-128: BENCHMARKS.md,
"Pod plan".
"""
from configs import models
from configs.common import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.unet = models.IP2P_UNET
  c.model.vae = models.SD15_VAE
  c.model.text_encoder = models.CLIP_L14_TEXT
  c.model.init_from = ""  # set to an SD 1.5 folder (local or gs://)
  c.model.compute_dtype = "bfloat16"
  c.model.remat = True
  c.data.path = ""        # a dataset built by `ip2p data import`
  c.data.resolution = 256
  c.data.max_resize = 1.125
  c.data.worker_count = 8
  c.data.sample_split = "train"
  c.batch_size = 1024
  c.grad_accum_steps = 1
  c.learning_rate = 1e-4
  c.total_steps = 10_000
  c.checkpoint_every = 500
  c.log_every = 50
  c.sample_every = 1000
  c.sample_steps = 20
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.distributed = True
  return c
