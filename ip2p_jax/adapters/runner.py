"""``customize(...)``: teach a model new concepts from a handful of examples
(``ip2p customize``). The examples live in memory; each step draws a batch, the jitted
train step (``ip2p_jax.train.step``) updates only what ``config.customize`` selects,
and the result is one adapter file.

A data folder holds ``metadata.jsonl``, one example per line, paths relative to the
folder::

    {"input_image": "a.png", "edited_image": "a_out.png", "instruction": "make it <new1>"}
    {"image": "b.png", "caption": "a <new1> square"}     # text-to-image bases

(``file_name`` and ``text`` are accepted for ``image`` and ``caption``, as Hugging Face's
imagefolder writes them.) The base decides which: an InstructPix2Pix editor trains on
edit triplets, a text-to-image folder on captioned images.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import numpy as np

FIELDS = {"instruct_pix2pix": (("input_image", "edited_image"), "instruction"),
          "text_to_image": (("image",), "caption")}
ALIASES = {"file_name": "image", "text": "caption"}
DEFAULT_LR = {"custom_diffusion": 1e-5, "lora": 1e-4}
# Only new tokens train (targets "none": textual inversion) or tokens with their key/value
# rows ("token_kv"): tiny parameter sets that start at zero or at a word's row, and move
# far: the rates the shapes-world example measured best (README, "Customization").
TOKEN_LR = {"none": 5e-3, "token_kv": 2e-2}


def default_learning_rate(method: str, targets: str) -> float:
  """The learning rate a customization run gets when none is given."""
  names = [t.strip() for t in (targets or "").split(",") if t.strip()]
  if method == "custom_diffusion" and names in (["none"], ["token_kv"]):
    return TOKEN_LR[names[0]]
  return DEFAULT_LR[method]


@dataclasses.dataclass
class Settings:
  method: str
  steps: int = 250
  learning_rate: float | None = None  # None: default_learning_rate(method, targets)
  batch_size: int = 2
  rank: int = 4
  alpha: float | None = None          # None: alpha = rank (scaling 1)
  targets: str = ""
  tokens: tuple[str, ...] = ()
  initializer: tuple[str, ...] = ()
  prior_weight: float = 1.0
  resolution: int | None = None       # None: the base's native size
  seed: int = 0


def stage_of(folder: str) -> str:
  """"instruct_pix2pix" when the UNet reads twice the VAE's latent channels."""
  with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as f:
    unet = json.load(f)
  with open(os.path.join(folder, "vae", "config.json"), encoding="utf-8") as f:
    vae = json.load(f)
  return ("instruct_pix2pix" if unet.get("in_channels") == 2 * vae.get("latent_channels", 4)
          else "text_to_image")


def native_resolution(folder: str) -> int:
  with open(os.path.join(folder, "unet", "config.json"), encoding="utf-8") as f:
    unet = json.load(f)
  with open(os.path.join(folder, "vae", "config.json"), encoding="utf-8") as f:
    vae = json.load(f)
  return int((unet.get("sample_size") or 64) * 2 ** (len(vae["block_out_channels"]) - 1))


def _image(path: str, resolution: int) -> np.ndarray:
  from PIL import Image, ImageOps
  with Image.open(path) as im:
    im = ImageOps.exif_transpose(im).convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side))
    return np.asarray(im.resize((resolution, resolution), Image.Resampling.BICUBIC))


def read_examples(folder: str, stage: str, resolution: int) -> list[dict]:
  """The examples of a data folder (module docstring) at ``resolution`` (uint8)."""
  meta = os.path.join(folder, "metadata.jsonl")
  if not os.path.isfile(meta):
    raise FileNotFoundError(f"--data {folder}: no metadata.jsonl (one JSON example per line)")
  images, text = FIELDS[stage]
  out = []
  with open(meta, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        raw = json.loads(line)
      except ValueError:
        raise ValueError(f"{meta}:{n}: not a JSON object") from None
      record = {ALIASES.get(k, k): v for k, v in raw.items()}
      missing = [k for k in images + (text,) if k not in record]
      if missing:
        kind = "edit triplets" if stage == "instruct_pix2pix" else "captioned images"
        raise ValueError(f"{meta}:{n}: missing {missing}; this base trains on {kind} "
                         f"({', '.join(images + (text,))})")
      example = {text: str(record[text])}
      for k in images:
        path = os.path.join(folder, record[k])
        if not os.path.isfile(path):
          raise FileNotFoundError(f"{meta}:{n}: {record[k]}: no such image")
        example[k] = _image(path, resolution)
      out.append(example)
  if not out:
    raise ValueError(f"{meta}: no examples")
  return out


def config_for(base: str, settings: Settings, stage: str, resolution: int):
  """The training config of a customization run (``configs/common.py`` keys)."""
  from ip2p_jax.configs.common import base_config
  c = base_config()
  c.stage = stage
  c.model.init_from = base
  with open(os.path.join(base, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
    c.scheduler = json.load(f)
  c.data.resolution = resolution
  c.batch_size = settings.batch_size
  c.learning_rate = (settings.learning_rate
                     or default_learning_rate(settings.method, settings.targets))
  c.total_steps = settings.steps
  c.ema_decay = 0.0  # the trained weights themselves; frozen leaves stay bitwise equal
  c.seed = settings.seed
  c.customize.method = settings.method
  c.customize.targets = settings.targets
  c.customize.rank = settings.rank
  c.customize.alpha = float(settings.alpha if settings.alpha is not None else settings.rank)
  c.customize.tokens = ",".join(settings.tokens)
  c.customize.initializer = ",".join(settings.initializer)
  c.customize.prior_weight = settings.prior_weight
  return c


def _batch(examples: list[dict], idx: np.ndarray, stage: str, tokenizer) -> dict:
  from ip2p_jax import tokenizer as tokenizers
  images, text = FIELDS[stage]
  batch = {k: np.stack([examples[i][k] for i in idx]) for k in images}
  batch["input_ids"] = tokenizers.tokenize(tokenizer, [examples[i][text] for i in idx])
  return batch


def customize(base: str, data: str | Sequence[str], out: str, settings: Settings, *,
              prior: str | Sequence[str] | None = None, progress: bool = True,
              log=print) -> dict:
  """Trains an adapter on the examples of ``data`` (one folder or several: several
  concepts train jointly) and writes it to ``out``; returns ``{"seconds", "loss",
  "bytes", "examples", "state"}``. ``prior``: regularisation example folders whose loss
  is weighted by ``settings.prior_weight`` (prior preservation)."""
  import jax
  from tqdm import tqdm

  from ip2p_jax.adapters import files
  from ip2p_jax.train import jobs
  from ip2p_jax.train import state as state_lib
  from ip2p_jax.train.step import make_step

  data = [data] if isinstance(data, str) else list(data)
  prior = [prior] if isinstance(prior, str) else list(prior or [])
  stage = stage_of(base)
  resolution = settings.resolution or native_resolution(base)
  examples = [e for folder in data for e in read_examples(folder, stage, resolution)]
  regular = [e for folder in prior for e in read_examples(folder, stage, resolution)]
  config = config_for(base, settings, stage, resolution)
  started = time.time()
  job = jobs.build(config)
  optimizer = state_lib.make_optimizer(config)
  schedule = state_lib.learning_rate_schedule(config)
  state = state_lib.create(job.load_params(), optimizer, config.seed)
  step = jax.jit(make_step(job.loss, optimizer, schedule, ema_decay=0.0),
                 donate_argnums=(0,))
  rng = np.random.default_rng(settings.seed)
  draw = lambda pool: rng.choice(len(pool), settings.batch_size,
                                 replace=len(pool) < settings.batch_size)
  bar = tqdm(range(settings.steps), desc=f"customize ({settings.method})", unit="step",
             disable=not progress, dynamic_ncols=True)
  loss = float("nan")
  for i in bar:
    batch = _batch(examples, draw(examples), stage, job.tokenizer)
    if regular:
      batch["prior"] = _batch(regular, draw(regular), stage, job.tokenizer)
    state, metrics = step(state, job.frozen_params, batch)
    if i % 10 == 9 or i == settings.steps - 1:
      loss = float(metrics["loss"])
      bar.set_postfix(loss=f"{loss:.4f}")
  bar.close()
  texts = [e[FIELDS[stage][1]] for e in examples]
  meta = {"base_model": os.path.basename(os.path.normpath(base)), "stage": stage,
          "prompts": list(dict.fromkeys(texts)), "steps": settings.steps,
          "resolution": resolution}
  adapter = job.customization.adapter(job.module, state.params, job.frozen_params, meta)
  files.save(out, adapter)
  seconds = time.time() - started
  return {"seconds": seconds, "loss": loss, "bytes": os.path.getsize(out),
          "examples": len(examples), "state": state, "job": job}
