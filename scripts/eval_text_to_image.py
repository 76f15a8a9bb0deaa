"""How often a text-to-image model draws what a shapes-world caption says.

  python scripts/eval_text_to_image.py [--model DIR] [--num 64] [--steps 20] [--sheet PNG]

Captions: the input captions of the shapes world's held-out split (``--num`` of them).
Each drawn picture is judged from colours by ``ip2p_jax.metrics.scene_match.depicts``
(background and every object colour right; layout is not judged). Prints JSON.
"""
import argparse
import json

import numpy as np
from PIL import Image

from ip2p_jax.data import shapes
from ip2p_jax.metrics import scene_match
from ip2p_jax.pipelines import TextToImagePipeline


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  p.add_argument("--model", help="text-to-image folder (default: the bundled one)")
  p.add_argument("--num", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sheet", help="write the first 16 pictures here (PNG)")
  args = p.parse_args()
  pipe = TextToImagePipeline.from_pretrained(args.model)
  size = pipe.unet.config.sample_size * pipe.vae_scale_factor
  scenes = [shapes.generate(args.seed, i, size, "heldout").input_scene for i in range(args.num)]
  result = scene_match.text_to_image_match(pipe, scenes, num_inference_steps=args.steps,
                                           seed=args.seed)
  images = result.pop("images")
  if args.sheet:
    Image.fromarray(np.concatenate(list(images[:16]), axis=1)).save(args.sheet)
  print(json.dumps({"model": args.model or "bundled", "steps": args.steps, **result}))


if __name__ == "__main__":
  main()
