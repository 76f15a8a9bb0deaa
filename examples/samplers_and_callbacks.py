"""A notebook's walk through the library, as a script (each ``# %%`` is a cell).

    python examples/samplers_and_callbacks.py --out /tmp/ip2p_walkthrough

Loads the bundled default model, edits one image with every sampler, collects the
intermediate latents of one edit with a per-step callback and plots them. Writes
``samplers.png`` (one edit per sampler) and ``latents.png`` (the latent after each step,
and the image decoded from it) to ``--out``. CI runs it (``.ci/run``).
"""
# %% Setup
import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ip2p_jax import InstructPix2PixPipeline  # noqa: E402
from ip2p_jax.diffusion import SAMPLERS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", default="walkthrough", help="folder for the two plots")
parser.add_argument("--steps", type=int, default=10, help="sampling steps per edit")
args = parser.parse_args()
os.makedirs(args.out, exist_ok=True)

# %% Load the bundled model (a small InstructPix2Pix trained on the shapes world, 128 px)
pipe = InstructPix2PixPipeline.from_pretrained()
pipe.set_progress_bar_config(disable=True)  # a notebook would keep the bar
image = os.path.join(HERE, "shapes_128.png")
instruction = "make the background black"
print("the folder's own sampler:", pipe.sampler_and_levels(None, args.steps)[0])

# %% Edit with each sampler (same seed: the differences are the samplers'). Each is configured
# as diffusers' `from_config` would, from this folder's scheduler_config.json (which sets
# clip_sample false, so DDIM and DDPM do not clip the predicted latent to [-1, 1]).
edits = {}
for name in SAMPLERS:
  edits[name] = pipe(instruction, image, scheduler=name, num_inference_steps=args.steps,
                     seed=0).images[0]
  print(f"{name}: done")

fig, axes = plt.subplots(1, len(edits) + 1, figsize=(2 * (len(edits) + 1), 2.4))
axes[0].imshow(plt.imread(image))
axes[0].set_title("input", fontsize=8)
for ax, (name, im) in zip(axes[1:], edits.items()):
  ax.imshow(im)
  ax.set_title(name, fontsize=8)
for ax in axes:
  ax.axis("off")
fig.suptitle(f'"{instruction}", {args.steps} steps')
fig.savefig(os.path.join(args.out, "samplers.png"), dpi=100, bbox_inches="tight")

# %% Intermediate latents with a callback (called from inside the compiled loop)
trajectory = []


def keep(step, timestep, latents):
  trajectory.append((step, timestep, latents[0]))


pipe(instruction, image, scheduler="dpmpp_2m", num_inference_steps=args.steps, seed=0,
     callback=keep, output_type="latent")
print(f"callback: {len(trajectory)} steps, latents {trajectory[0][2].shape} (h, w, channels)")

# %% Plot them: the first three latent channels as RGB, and the image each latent decodes to
# (DPM-Solver keeps the VP latent; its decoded image sharpens as the noise goes).
decoded = pipe.decode_latents(np.stack([z for _, _, z in trajectory]))
fig, axes = plt.subplots(2, len(trajectory), figsize=(1.6 * len(trajectory), 3.4))
for k, (step, timestep, z) in enumerate(trajectory):
  rgb = z[..., :3]
  rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min() + 1e-8)
  axes[0, k].imshow(rgb, interpolation="nearest")
  axes[0, k].set_title(f"step {step}\nt={timestep:.0f}", fontsize=7)
  axes[1, k].imshow(decoded[k])
for ax in axes.ravel():
  ax.axis("off")
fig.savefig(os.path.join(args.out, "latents.png"), dpi=100, bbox_inches="tight")
print("wrote", os.path.join(args.out, "samplers.png"), "and", os.path.join(args.out, "latents.png"))
