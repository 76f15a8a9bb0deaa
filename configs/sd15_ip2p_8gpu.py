"""InstructPix2Pix at SD 1.5 scale on one 8-GPU node (the paper's 8x A100 setup):
batch 32 per GPU x 8 GPUs x 4 accumulation = 1024 effective, lr 1e-4, 10k steps, 256 px.

  python scripts/train.py --config=configs/sd15_ip2p_8gpu.py --workdir=/ckpt/ip2p \
      --config.model.init_from=/models/stable-diffusion-v1-5 --config.data.path=/data/ip2p

Several nodes (SLURM): one task per node with all its GPUs, e.g.
  srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 python scripts/train.py \
      --config=configs/sd15_ip2p_8gpu.py --workdir=/shared/ip2p --config.distributed=True
jax.distributed.initialize() reads the SLURM environment; scale batch_size with nodes.
"""
from configs.sd15_ip2p_tpu_pod import get_config as pod_config


def get_config(arg=None):
  c = pod_config(arg)
  c.batch_size = 1024
  c.grad_accum_steps = 4
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.distributed = False
  return c
