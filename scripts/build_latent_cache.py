"""Latents and text states of the default model's training triplets (stage 1 and 2 read
them: ``config.data.latents``), from the trained VAE and CLIP text tower.

  python scripts/build_latent_cache.py   (paths from configs/default_model.py)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from configs import default_model  # noqa: E402
from ip2p_jax import tokenizer as tokenizers  # noqa: E402
from ip2p_jax.checkpoints import PipelineParts, load_component  # noqa: E402
from ip2p_jax.data import builders, latent_cache  # noqa: E402


def main():
  config = default_model.get_config("t2i")
  modules, params = {}, {}
  for name, folder in (("vae", config.model.vae_from),
                       ("text_encoder", config.model.text_encoder_from)):
    modules[name], params[name] = load_component(folder)
  parts = PipelineParts(modules, params, tokenizers.load(), {}, {})
  source = builders.open_split(config.data.path, "train",
                               skip_decoding=("edit_mask",))
  out = config.data.latents
  os.makedirs(os.path.dirname(out), exist_ok=True)
  partial = out + ".partial"
  with tqdm(total=len(source), unit="ex", desc="caching latents") as bar:
    n = latent_cache.build(source, partial, parts, resolution=config.data.resolution,
                           batch_size=64, progress=bar.update)
  os.replace(partial, out)
  print(f"wrote {n} records to {out}")


if __name__ == "__main__":
  main()
