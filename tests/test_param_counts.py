"""Parameter counts of the full-size configs, from ``jax.eval_shape`` (nothing is
allocated), against closed-form arithmetic and against diffusers/transformers
instantiated on PyTorch's meta device."""
import math

import pytest
import torch

from configs import models as presets
from ip2p_jax.checkpoints import abstract_params, module_from_config


def count(module) -> int:
  import jax
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(module)))


# Closed-form counts. conv(k,i,o) = k*k*i*o + o, lin(i,o) = i*o (+ o with bias), norms 2c.
def conv(k, i, o):
  return k * k * i * o + o


def lin(i, o, bias=True):
  return i * o + (o if bias else 0)


def resnet(i, o, temb=None):
  return (2 * i + conv(3, i, o) + (lin(temb, o) if temb else 0) + 2 * o + conv(3, o, o)
          + (conv(1, i, o) if i != o else 0))


def transformer(c, ctx):
  self_attn = 3 * lin(c, c, False) + lin(c, c)
  cross_attn = lin(c, c, False) + 2 * lin(ctx, c, False) + lin(c, c)
  feed_forward = lin(c, 8 * c) + lin(4 * c, c)  # GEGLU writes value and gate
  block = 3 * 2 * c + self_attn + cross_attn + feed_forward
  return 2 * c + conv(1, c, c) + block + conv(1, c, c)  # norm, proj_in, block, proj_out


def sd_unet(in_channels, ch=(320, 640, 1280, 1280), ctx=768, layers=2):
  temb = 4 * ch[0]
  n = conv(3, in_channels, ch[0]) + lin(ch[0], temb) + lin(temb, temb)
  skips, prev = [ch[0]], ch[0]
  for i, c in enumerate(ch):  # down: attention in all but the last level
    for _ in range(layers):
      n += resnet(prev, c, temb) + (transformer(c, ctx) if i < 3 else 0)
      prev = c
      skips.append(c)
    if i < len(ch) - 1:
      n += conv(3, c, c)
      skips.append(c)
  n += 2 * resnet(ch[-1], ch[-1], temb) + transformer(ch[-1], ctx)
  for i, c in enumerate(reversed(ch)):  # up: attention in all but the first level
    for _ in range(layers + 1):
      n += resnet(prev + skips.pop(), c, temb) + (transformer(c, ctx) if i > 0 else 0)
      prev = c
    if i < len(ch) - 1:
      n += conv(3, c, c)
  return n + 2 * ch[0] + conv(3, ch[0], 4)


def sd_vae(ch=(128, 256, 512, 512), layers=2, latent=4):
  mid = lambda c: 2 * resnet(c, c) + 2 * c + 4 * lin(c, c)
  enc, prev = conv(3, 3, ch[0]), ch[0]
  for i, c in enumerate(ch):
    for _ in range(layers):
      enc += resnet(prev, c)
      prev = c
    enc += conv(3, c, c) if i < len(ch) - 1 else 0
  enc += mid(ch[-1]) + 2 * ch[-1] + conv(3, ch[-1], 2 * latent)
  dec, prev = conv(3, latent, ch[-1]) + mid(ch[-1]), ch[-1]
  for i, c in enumerate(reversed(ch)):
    for _ in range(layers + 1):
      dec += resnet(prev, c)
      prev = c
    dec += conv(3, c, c) if i < len(ch) - 1 else 0
  dec += 2 * ch[0] + conv(3, ch[0], 3)
  return enc + dec + conv(1, 2 * latent, 2 * latent) + conv(1, latent, latent)


def clip_tower(d, mlp, layers):
  return layers * (2 * 2 * d + 4 * lin(d, d) + lin(d, mlp) + lin(mlp, d))


def clip_text(vocab=49408, pos=77, d=768, mlp=3072, layers=12):
  return vocab * d + pos * d + clip_tower(d, mlp, layers) + 2 * d


def clip_vision(d=1024, mlp=4096, layers=24, patch=14, image=224, proj=768):
  tokens = (image // patch) ** 2 + 1
  return (d + 3 * patch * patch * d + tokens * d + 2 * d + clip_tower(d, mlp, layers) + 2 * d
          + d * proj)


CASES = {
    # name: (preset, closed form, published count)
    "sd15_unet": (presets.SD15_UNET, sd_unet(4), 859_520_964),
    "ip2p_unet": (presets.IP2P_UNET, sd_unet(8), 859_520_964 + 4 * 9 * 320),
    "sd15_vae": (presets.SD15_VAE, sd_vae(), 83_653_863),
    "clip_l14_text": (presets.CLIP_L14_TEXT, clip_text(), 123_060_480),
    "clip_l14_vision": (presets.CLIP_L14_VISION, clip_vision(), 303_966_208),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_full_size_parameter_count(name):
  preset, closed_form, published = CASES[name]
  assert closed_form == published
  assert count(module_from_config(preset)) == published


def _torch_meta_count(preset) -> int:
  import diffusers
  import transformers
  cfg = {k: v for k, v in preset.items() if not k.startswith("_") and k != "architectures"}
  with torch.device("meta"):
    if preset.get("_class_name") == "UNet2DConditionModel":
      model = diffusers.UNet2DConditionModel(**cfg)
    elif preset.get("_class_name") == "AutoencoderKL":
      model = diffusers.AutoencoderKL(**cfg)
    elif preset["model_type"] == "clip_text_model":
      model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))
    else:
      model = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**cfg))
  return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["sd15_unet", "sd15_vae", "clip_l14_text", "clip_l14_vision"])
def test_count_equals_reference_library(name):
  preset = CASES[name][0]
  assert count(module_from_config(preset)) == _torch_meta_count(preset)
