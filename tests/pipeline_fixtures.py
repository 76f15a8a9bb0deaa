"""Tiny diffusers pipelines saved to disk, shared by the pipeline and CLI tests."""
import diffusers
import torch
import transformers

from configs import models as presets
from conftest import randomize_
from ip2p_jax import tokenizer as tokenizers

SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 timestep_spacing="leading", steps_offset=1)


def _strip(d):
  return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("architectures",
                                                                          "model_type")}


def components(in_channels: int, seed: int = 0):
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**{**_strip(presets.TINY_UNET), "in_channels": in_channels})
  vae = diffusers.AutoencoderKL(**_strip(presets.TINY_VAE))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_strip(presets.TINY_CLIP_TEXT)))
  for m in (unet, vae, text):
    randomize_(m, seed)
    m.eval()
  return dict(unet=unet, vae=vae, text_encoder=text,
              tokenizer=tokenizers.transformers_tokenizer(),
              scheduler=diffusers.EulerAncestralDiscreteScheduler(**SCHEDULER),
              safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_ip2p(folder) -> "diffusers.StableDiffusionInstructPix2PixPipeline":
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline(**components(8))
  pipe.save_pretrained(folder)
  return pipe


def save_sd(folder) -> "diffusers.StableDiffusionPipeline":
  pipe = diffusers.StableDiffusionPipeline(**components(4, seed=1))
  pipe.save_pretrained(folder)
  return pipe
