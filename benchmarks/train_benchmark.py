"""Stage-2 (InstructPix2Pix) train step: ip2p_jax vs the equivalent PyTorch step written
with diffusers' models (as in diffusers' train_instruct_pix2pix.py), same random weights,
batch, resolution and optimizer (AdamW lr 1e-4, clip 1.0), in one run.

  python benchmarks/train_benchmark.py --size small --resolution 64 --batch 8

Both steps: VAE-encode both images (no grad), encode the instruction (no grad), noise
the edited latent at random timesteps, UNet forward/backward on [noisy, image latent],
clip, AdamW, and an exponential moving average of the UNet's weights (decay 0.9999: ours
always keeps one; PyTorch's is diffusers' ``EMAModel`` with ``foreach``, what the
diffusers script does with ``--use_ema``; before 2026-11-29's second sitting the
PyTorch step had none). Reports seconds per step (best of --repeats after warm-up,
the two alternating) and the ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from common import SIZES, best_of_both, diffusers_ip2p, machine


def torch_step_fn(pipe, batch, lr=1e-4):
  import torch
  import torch.nn.functional as F
  from diffusers.training_utils import EMAModel
  unet, vae, text = pipe.unet, pipe.vae, pipe.text_encoder
  unet.train()
  opt = torch.optim.AdamW(unet.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=1e-2)
  ema = EMAModel(unet.parameters(), decay=0.9999, foreach=True)
  sched = pipe.scheduler
  ac = sched.alphas_cumprod
  inputs = torch.from_numpy(batch["input_image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
  edited = torch.from_numpy(batch["edited_image"]).permute(0, 3, 1, 2).float() / 127.5 - 1
  ids = torch.from_numpy(batch["input_ids"]).long()

  def step():
    with torch.no_grad():
      latents = vae.encode(edited).latent_dist.sample() * vae.config.scaling_factor
      cond = vae.encode(inputs).latent_dist.mode()
      states = text(ids)[0]
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],))
    a = ac[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(torch.cat([noisy, cond], 1), t, states).sample
    loss = F.mse_loss(pred.float(), noise.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema.step(unet.parameters())
  return step


def random_batch(tokenizer, resolution: int, batch: int) -> dict:
  from ip2p_jax import tokenizer as tokenizers
  rng = np.random.default_rng(0)
  r = resolution
  return {"input_image": rng.integers(0, 256, (batch, r, r, 3), dtype=np.uint8),
          "edited_image": rng.integers(0, 256, (batch, r, r, 3), dtype=np.uint8),
          "input_ids": tokenizers.tokenize(tokenizer, ["make it red"] * batch)}


def our_step(parts, batch):
  """``run()``: one jitted stage-2 step on ``batch``, waited for."""
  import jax
  import jax.numpy as jnp
  import ml_collections

  from ip2p_jax import tokenizer as tokenizers
  from ip2p_jax.diffusion import schedules
  from ip2p_jax.train import objectives
  from ip2p_jax.train import state as state_lib
  from ip2p_jax.train.step import make_step

  config = ml_collections.ConfigDict(dict(
      stage="instruct_pix2pix", learning_rate=1e-4, warmup_steps=0, lr_schedule="constant",
      total_steps=1000,
      grad_clip_norm=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2))
  schedule = schedules.ScheduleConfig.from_dict(parts.scheduler_config, "euler_ancestral")
  loss = objectives.instruct_pix2pix(parts.modules["unet"], parts.modules["vae"],
                                     parts.modules["text_encoder"], schedule,
                                     tokenizers.tokenize(parts.tokenizer, [""])[0])
  optimizer = state_lib.make_optimizer(config)
  frozen = {k: parts.params[k] for k in ("vae", "text_encoder")}
  step = jax.jit(make_step(loss, optimizer, state_lib.learning_rate_schedule(config),
                           ema_decay=0.9999, fused=state_lib.FusedAdamW.of(config)),
                 donate_argnums=(0,))
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  holder = [state_lib.create(parts.params["unet"], optimizer, 0)]

  def run():
    holder[0], metrics = step(holder[0], frozen, jbatch)
    jax.block_until_ready(metrics)

  return run


def setup(size: str, resolution: int, batch: int):
  """The random diffusers pipeline, the same weights loaded by us, and a batch."""
  from ip2p_jax.checkpoints import load_pipeline
  ref = diffusers_ip2p(size)
  folder = tempfile.mkdtemp()
  ref.save_pretrained(folder)
  parts = load_pipeline(folder)
  return ref, parts, random_batch(parts.tokenizer, resolution, batch)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--size", choices=sorted(SIZES), default="small")
  p.add_argument("--resolution", type=int, default=64)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=8)
  args = p.parse_args()

  import jax
  import torch

  ref, parts, batch = setup(args.size, args.resolution, args.batch)
  run_ours = our_step(parts, batch)
  t = time.perf_counter()
  run_ours()
  first = time.perf_counter() - t
  torch_step = torch_step_fn(ref, batch)
  torch_step()
  run_ours()
  ours, theirs = best_of_both(run_ours, torch_step, args.repeats)
  n_params = sum(x.size for x in jax.tree.leaves(parts.params["unet"]))
  print(f"machine: {machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"size={args.size} (UNet {n_params:,} params) resolution={args.resolution} "
        f"batch={args.batch}")
  print(f"ours {ours:.3f} s/step (compile+first {first - ours:.1f} s); "
        f"diffusers/PyTorch {theirs:.3f} s/step; ratio ours/theirs = {ours / theirs:.2f}")


if __name__ == "__main__":
  main()
