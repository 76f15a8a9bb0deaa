"""Latents and text states of the default model's training triplets (stage 1 and 2 read
them: ``config.data.latents``), from the trained VAE and CLIP text tower.

  python scripts/build_latent_cache.py [--config configs/default_model.py:t2i]

The encoders, the dataset and the output file are the config's (``model.vae_from``,
``model.text_encoder_from``, ``data.path``, ``data.latents``).
"""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from ip2p_jax import tokenizer as tokenizers  # noqa: E402
from ip2p_jax.checkpoints import PipelineParts, load_component  # noqa: E402
from ip2p_jax.data import builders, latent_cache  # noqa: E402


def _config(spec: str):
  """``configs/NAME.py:STAGE`` -> that module's ``get_config(STAGE)``."""
  path, _, stage = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  module = importlib.import_module(f"configs.{name}")
  return module.get_config(stage) if stage else module.get_config()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default_model.py:t2i")
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args()
  config = _config(args.config)
  modules, params = {}, {}
  for name, folder in (("vae", config.model.vae_from),
                       ("text_encoder", config.model.text_encoder_from)):
    modules[name], params[name] = load_component(folder)
  parts = PipelineParts(modules, params,
                        tokenizers.load(config.model.get("tokenizer_from") or None), {}, {})
  source = builders.open_split(config.data.path, "train",
                               skip_decoding=("edit_mask",))
  out = config.data.latents
  os.makedirs(os.path.dirname(out), exist_ok=True)
  partial = out + ".partial"
  with tqdm(total=len(source), unit="ex", desc="caching latents") as bar:
    n = latent_cache.build(source, partial, parts, resolution=config.data.resolution,
                           batch_size=args.batch_size, progress=bar.update)
  os.replace(partial, out)
  print(f"wrote {n} records to {out}")


if __name__ == "__main__":
  main()
