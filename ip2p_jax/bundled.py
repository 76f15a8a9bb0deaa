"""Where the models shipped inside the package live (``scripts/install_default_model.py``
writes them; ``configs/default_model.py`` says how they were trained):

  DEFAULT_MODEL  the InstructPix2Pix editor, a diffusers folder
                 (``$IP2P_DEFAULT_MODEL`` points elsewhere)
  DEFAULT_T2I    its stage-1 text-to-image UNet and scheduler; the VAE, text encoder and
                 tokenizer are the editor's (one copy in the package)
  DEFAULT_CLIP   the CLIP whose similarities ``ip2p eval`` reports: its vision tower and
                 projections; its text tower is the editor's text encoder (the same
                 weights, stored once)

With ``$IP2P_DEFAULT_MODEL`` set, the text-to-image model and the CLIP take their shared
parts (VAE, text encoder, tokenizer; CLIP's text tower) from that folder and their own
(the stage-1 UNet; CLIP's vision tower) from the package: a pairing that only makes
sense if that folder's encoders are the bundled ones.
"""
from __future__ import annotations

import dataclasses
import json
import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEFAULT_MODEL = os.path.join(ASSETS, "default_model")
DEFAULT_T2I = os.path.join(ASSETS, "default_t2i")
DEFAULT_CLIP = os.path.join(ASSETS, "default_clip")


def editor_path() -> str:
  """The bundled editor's folder (``$IP2P_DEFAULT_MODEL`` overrides it)."""
  return os.environ.get("IP2P_DEFAULT_MODEL", DEFAULT_MODEL)


def load_text_to_image(**kwargs):
  """The bundled stage-1 model as ``PipelineParts``: its UNet and scheduler with the
  editor's VAE, text encoder and tokenizer (they were frozen in both stages)."""
  from ip2p_jax.checkpoints import load_component, load_pipeline
  editor = load_pipeline(editor_path(), **kwargs)
  unet, params = load_component(os.path.join(DEFAULT_T2I, "unet"), **kwargs)
  with open(os.path.join(DEFAULT_T2I, "scheduler", "scheduler_config.json"),
            encoding="utf-8") as f:
    scheduler = json.load(f)
  return dataclasses.replace(
      editor, modules={**editor.modules, "unet": unet}, params={**editor.params, "unet": params},
      scheduler_config=scheduler,
      model_index={**editor.model_index, "_class_name": "StableDiffusionPipeline"})


def load_clip(**kwargs):
  """The bundled CLIP as ``(module, params)``: DEFAULT_CLIP's weights plus the editor's
  text encoder as its ``text_model``."""
  from ip2p_jax.checkpoints import io
  raw = io._read_json(os.path.join(DEFAULT_CLIP, "config.json"))
  clip = io.module_from_config(raw, **kwargs)
  state = {**io.read_state_dict(DEFAULT_CLIP, "model"),
           **io.read_state_dict(os.path.join(editor_path(), "text_encoder"), "model")}
  kind = io.formats.kind_of_config(raw, DEFAULT_CLIP)
  return clip, io.params_from_state_dict(kind, clip, state, DEFAULT_CLIP)
