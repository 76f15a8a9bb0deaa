"""Loading and saving diffusers/transformers folders, safetensors only.

    module, params = load_component("sd15/unet")
    parts = load_pipeline("instruct-pix2pix")  # parts.params = {"unet", "vae", "text_encoder"}
    save_pipeline("out", parts)                # diffusers' PyTorch pipeline loads this

Pickle-based weights (``.bin``, ``.ckpt``, ``.pt``) are never opened: they can
run arbitrary code. Loading checks every tensor: missing, unexpected and
mis-shaped ones are listed together in one error.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ip2p_jax import paths
from ip2p_jax import tokenizer as tokenizers
from ip2p_jax.atomic import atomic_write
from ip2p_jax.checkpoints import formats, safetensors

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
PIPELINE_MODELS = ("unet", "vae", "text_encoder")


class CheckpointError(ValueError):
  """A model folder cannot be loaded as asked."""


class UnsafeWeightsError(CheckpointError):
  """Only pickle-based weight files were found; we refuse to unpickle them."""


def resolve(path_or_id: str) -> str:
  """A folder for ``path_or_id``: the folder itself (local or in a bucket, ``gs://...``),
  or a Hugging Face hub id found in the local cache. Never downloads from the hub."""
  if paths.isdir(path_or_id):
    return path_or_id
  if paths.isfile(path_or_id):
    if path_or_id.endswith(PICKLE_SUFFIXES):
      raise UnsafeWeightsError(_pickle_message([path_or_id]))
    raise CheckpointError(f"{path_or_id}: a single weights file; pass a diffusers-format folder "
                          "(with model_index.json or config.json) instead")
  looks_like_hub_id = (paths.is_local(path_or_id) and path_or_id.count("/") == 1
                       and not path_or_id.startswith((".", "/", "~")))
  if looks_like_hub_id:
    try:
      import huggingface_hub
      return huggingface_hub.snapshot_download(path_or_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
      raise CheckpointError(
          f"{path_or_id!r} is not a local folder and is not in the local Hugging Face cache. "
          f"This library does not download at run time: fetch it where the hub is reachable "
          f"(`hf download {path_or_id} --local-dir DIR`) and pass the local folder."
      ) from None
  raise CheckpointError(f"{path_or_id}: no such folder")


def _pickle_message(files: list[str]) -> str:
  return (f"refusing to load pickle-based weights {sorted(files)}: unpickling can execute "
          "arbitrary code. Convert them to safetensors once, in a trusted environment: "
          "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)` "
          "(diffusers/transformers), or for a single-file .ckpt, diffusers' "
          "scripts/convert_original_stable_diffusion_to_diffusers.py --to_safetensors.")


def _read_json(path: str) -> dict:
  """A JSON object from ``path``; a missing file, invalid JSON or another JSON type
  (``[]``, a string) is a :class:`CheckpointError` naming the file."""
  try:
    with paths.open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(_missing_message(path)) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object ({{\"key\": value, ...}}), "
                          f"got a JSON {type(data).__name__}")
  return data


def _missing_message(path: str) -> str:
  """Why ``path`` (a config file) is missing, saying what its folder holds instead:
  pickle-only weights are refused as such, a component folder is told apart from a pipeline."""
  folder, name = os.path.split(path)
  pickles = sorted(p for p in paths.glob(folder, "*") if p.endswith(PICKLE_SUFFIXES))
  if pickles and not paths.glob(folder, "*.safetensors"):
    return (f"{folder}: holds only pickle-based weights {[os.path.basename(p) for p in pickles]} "
            f"and no {name}. " + _pickle_message(pickles))
  if name == "model_index.json" and paths.isfile(os.path.join(folder, "config.json")):
    return (f"{path}: missing; {folder} is a single component folder (config.json), not a "
            "pipeline: pass the folder above it that holds model_index.json")
  return f"{path}: missing"


def _weight_files(folder: str, stem: str, variant: str | None) -> list[str]:
  """The safetensors file(s) holding a component's weights."""
  names = [f"{stem}.{variant}" if variant else stem]
  if not variant:
    names += [f"{stem}.fp16", f"{stem}.bf16"]  # a folder holding only a variant
  for name in names:
    single = os.path.join(folder, f"{name}.safetensors")
    if paths.isfile(single):
      return [single]
    indexes = [f"{name}.safetensors.index.json"]
    if variant:  # diffusers names sharded variants stem.safetensors.index.VARIANT.json
      indexes.append(f"{stem}.safetensors.index.{variant}.json")
    for index in (os.path.join(folder, i) for i in indexes):
      if paths.isfile(index):
        weight_map = _read_json(index).get("weight_map", {})
        return [os.path.join(folder, f) for f in sorted(set(weight_map.values()))]
  pickles = [p for p in paths.glob(folder, "*") if p.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise UnsafeWeightsError(_pickle_message(pickles))
  raise CheckpointError(f"{folder}: no weights found (expected {names[0]}.safetensors "
                        f"or {names[0]}.safetensors.index.json)")


def read_state_dict(folder: str, stem: str, variant: str | None = None) -> dict[str, np.ndarray]:
  state = {}
  for path in _weight_files(folder, stem, variant):
    if not paths.isfile(path):
      raise CheckpointError(f"{path}: listed in the shard index but missing")
    try:
      state.update(safetensors.load(path))
    except safetensors.SafetensorsError as e:
      raise CheckpointError(str(e)) from None
  return state


def abstract_params(module: nn.Module) -> dict:
  """Parameter shapes and dtypes of ``module`` without allocating anything.

  Tracing ``init`` under ``jax.eval_shape`` costs about 1.1 s for the bundled model's
  three modules, on every load. Where JAX's persistent compilation cache is on
  (:mod:`ip2p_jax.compilation`: the CLI and ``from_pretrained`` by default), the result
  is kept in its folder too, under ``ip2p_param_shapes/``, keyed by the module (class,
  config, dtypes) and the source of ``ip2p_jax.models``, so a later process reads it
  instead; ``--no-compilation-cache`` or ``IP2P_COMPILATION_CACHE=off`` keeps nothing."""
  from ip2p_jax.sharding import strip_boxes  # not nn.unbox: it constrains under a mesh
  folder = jax.config.jax_compilation_cache_dir
  stored = (os.path.join(folder, "ip2p_param_shapes", _shapes_key(module) + ".json")
            if folder and paths.is_local(folder) else None)
  if stored and os.path.isfile(stored):
    try:
      with open(stored, encoding="utf-8") as f:
        table = json.load(f)
      return traverse_util.unflatten_dict({
          tuple(k.split("/")): jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))
          for k, (shape, dtype) in table.items()})
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable: trace again
      pass
  shapes = strip_boxes(jax.eval_shape(
      lambda: module.init(jax.random.key(0), *module.dummy_inputs()))["params"])
  if stored:
    table = {"/".join(k): [list(v.shape), str(v.dtype)]
             for k, v in traverse_util.flatten_dict(shapes).items()}
    try:
      os.makedirs(os.path.dirname(stored), exist_ok=True)
      with atomic_write(stored, "w", encoding="utf-8") as f:
        json.dump(table, f)
    except OSError:  # a read-only cache folder only costs the tracing next time
      pass
  return shapes


def _shapes_key(module: nn.Module) -> str:
  """What a module's parameter shapes depend on: its class, fields (config, dtypes) and
  the code that defines it (ours, flax's, jax's) and JAX's default widths."""
  import flax
  text = (f"{type(module).__module__}.{type(module).__qualname__}\n{module!r}\n"
          f"{_models_digest()}\nflax {flax.__version__} jax {jax.__version__} "
          f"x64 {jax.config.jax_enable_x64}")
  return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def _models_digest() -> str:
  """A digest of the source of ``ip2p_jax.models`` (where every module is defined)."""
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
  digest = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    if name.endswith(".py"):
      with open(os.path.join(folder, name), "rb") as f:
        digest.update(name.encode() + b"\0" + f.read())
  return digest.hexdigest()


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  return formats.to_torch(path, np.empty(shape, np.uint8)).shape


def params_from_state_dict(kind: formats.ComponentKind, module: nn.Module,
                           state: Mapping[str, np.ndarray], where: str,
                           shardings: Any = None) -> dict:
  """Our parameter pytree from a PyTorch state dict; one error lists every problem.

  ``shardings`` (a pytree of ``jax.sharding.Sharding`` like the params): each parameter
  is made with ``jax.make_array_from_callback``, which asks only for the slices this
  process's devices hold; over memory-mapped safetensors only those bytes are read, and
  over a file in a bucket only the rows those slices span (``safetensors.LazyTensor``)."""
  expected = traverse_util.flatten_dict(abstract_params(module))
  params, missing, misshaped, used = {}, [], [], set()
  for path, spec in expected.items():
    key = formats.torch_key(path)
    found = next((k for k in [key, *kind.aliases(key)] if k in state), None)
    if found is None:
      missing.append(key)
      continue
    used.add(found)
    array = formats.from_torch(path, state[found])
    if array.shape != spec.shape:
      misshaped.append(f"{key}: file has {tuple(state[found].shape)}, model needs "
                       f"{_torch_shape(path, spec.shape)}")
      continue
    params[path] = array
  unexpected = sorted(set(state) - used - kind.buffers)
  if missing or unexpected or misshaped:
    lines = [f"{where}: weights do not match the {kind.class_name} described by config.json"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
        lines.append(f"  {len(items)} {title}: {shown}")
    raise CheckpointError("\n".join(lines))
  dtypes = {p: s.dtype for p, s in expected.items()}
  if shardings is None:
    return traverse_util.unflatten_dict(
        {p: jnp.asarray(np.asarray(a, dtype=dtypes[p])) for p, a in params.items()})
  placement = traverse_util.flatten_dict(dict(shardings))
  return traverse_util.unflatten_dict(
      {p: _sharded(a, dtypes[p], placement[p]) for p, a in params.items()})


def _sharded(array: np.ndarray, dtype, sharding) -> jax.Array:
  """A global array whose shards are read from ``array`` (a memory-mapped view) only
  for the devices of this process."""
  out = jax.make_array_from_callback(array.shape, sharding,
                                     lambda index: np.asarray(array[index], dtype=dtype))
  if isinstance(array, safetensors.LazyTensor):
    array.release()
  return out


def module_from_config(raw: Mapping[str, Any], *, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32, where: str = "config",
                       **module_kwargs) -> nn.Module:
  """Our module for a diffusers/transformers config dict (e.g. ``configs.models.SD15_UNET``)."""
  kind = formats.kind_of_config(raw, where)
  return kind.module(kind.build(raw), dtype=dtype, param_dtype=param_dtype, **module_kwargs)


def load_component(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                   variant: str | None = None, shardings: Any = None,
                   **module_kwargs) -> tuple[nn.Module, dict]:
  """``(module, params)`` for one component folder (``config.json`` + safetensors).

  ``dtype`` is the compute dtype, ``param_dtype`` the dtype parameters are stored
  in (fp16 files are upcast to it). ``module_kwargs`` go to the module
  (e.g. ``attention_implementation``, ``remat`` for the UNet). ``shardings``: a
  function ``module -> pytree of shardings``; each process then reads only the
  parameter slices its devices hold (see :func:`params_from_state_dict`).
  """
  folder = resolve(path)
  where = os.path.join(folder, "config.json")
  raw = _read_json(where)
  kind = formats.kind_of_config(raw, where)
  module = module_from_config(raw, dtype=dtype, param_dtype=param_dtype, where=where,
                              **module_kwargs)
  state = read_state_dict(folder, kind.weights_name, variant)
  placement = shardings(module) if shardings is not None else None
  return module, params_from_state_dict(kind, module, state, folder, placement)


def _version(package: str, fallback: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return fallback


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  with atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")


def save_component(path: str, module: nn.Module, params: Mapping[str, Any], *,
                   dtype: Any = None, max_shard_bytes: int | None = None) -> None:
  """Writes ``config.json`` and safetensors weights in the diffusers/transformers
  layout of ``module`` (sharded with an ``.index.json`` above ``max_shard_bytes``)."""
  kind = formats.kind_of_config_object(module.config, module)
  os.makedirs(path, exist_ok=True)
  config = module.config.to_dict()
  if kind.library == "diffusers":
    config["_diffusers_version"] = _version("diffusers", "0.42.0")
  else:
    config["transformers_version"] = _version("transformers", "5.0.0")
  flat = traverse_util.flatten_dict(nn.unbox(dict(params)))
  tensors = {}
  for p, a in flat.items():
    array = np.asarray(jax.device_get(a))
    if dtype is not None:
      array = array.astype(dtype)
    tensors[formats.torch_key(p)] = formats.to_torch(p, array)
  _write_weights(path, kind.weights_name, tensors, max_shard_bytes)
  _write_json(os.path.join(path, "config.json"), config)


def _write_weights(folder: str, stem: str, tensors: dict[str, np.ndarray],
                   max_shard_bytes: int | None) -> None:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(tensors):
    if max_shard_bytes and shards[-1] and size + tensors[key].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = tensors[key]
    size += tensors[key].nbytes
  if len(shards) == 1:
    safetensors.save(os.path.join(folder, f"{stem}.safetensors"), shards[0])
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.save(os.path.join(folder, name), shard)
    weight_map.update({k: name for k in shard})
  _write_json(os.path.join(folder, f"{stem}.safetensors.index.json"),
              {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map})


@dataclasses.dataclass
class PipelineParts:
  """Everything in a diffusers pipeline folder that the JAX side uses."""
  modules: dict[str, nn.Module]   # "unet", "vae", "text_encoder"
  params: dict[str, Any]          # the one parameter pytree, same keys
  tokenizer: Any
  scheduler_config: dict[str, Any]
  model_index: dict[str, Any]


@dataclasses.dataclass
class PipelineInfo:
  """What :func:`check_pipeline` read from a pipeline folder without loading weights."""
  folder: str
  configs: dict[str, Any]          # "unet", "vae", "text_encoder": parsed config dataclasses
  scheduler_config: dict[str, Any]
  tokenizer_dir: str | None


def check_pipeline(path: str, variant: str | None = None) -> PipelineInfo:
  """Checks everything about a pipeline folder that can be checked without reading the
  weights: ``model_index.json``, every component's ``config.json`` (structure and types),
  the safetensors files' presence and headers. Errors are :class:`CheckpointError` naming
  the file and the problem; :func:`load_pipeline` then only reads tensors."""
  folder = resolve(path)
  _read_json(os.path.join(folder, "model_index.json"))
  configs = {}
  for name in PIPELINE_MODELS:
    sub = os.path.join(folder, name)
    if not paths.isdir(sub):
      raise CheckpointError(f"{folder}: pipeline component folder {name}/ is missing")
    configs[name] = check_component(sub, variant)
  sched = os.path.join(folder, "scheduler", "scheduler_config.json")
  scheduler_config = _read_json(sched) if paths.isfile(sched) else {}
  tok_dir = os.path.join(folder, "tokenizer")
  return PipelineInfo(folder, configs, scheduler_config, tok_dir if paths.isdir(tok_dir) else None)


def check_component(folder: str, variant: str | None = None) -> Any:
  """One component folder's parsed config, after checking its weight files' headers."""
  where = os.path.join(folder, "config.json")
  raw = _read_json(where)
  kind = formats.kind_of_config(raw, where)
  try:
    config = kind.build(raw)
  except ValueError as e:
    raise CheckpointError(f"{where}: {e}") from None
  for weights in _weight_files(folder, kind.weights_name, variant):
    if not paths.isfile(weights):
      raise CheckpointError(f"{weights}: listed in the shard index but missing")
    try:
      safetensors.read_header(weights)
    except safetensors.SafetensorsError as e:
      raise CheckpointError(str(e)) from None
  return config


def load_pipeline(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                  variant: str | None = None, **unet_kwargs) -> PipelineParts:
  """A Stable Diffusion / InstructPix2Pix folder (``model_index.json``, ``unet/``,
  ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``)."""
  folder = resolve(path)
  index = _read_json(os.path.join(folder, "model_index.json"))
  modules, params = {}, {}
  for name in PIPELINE_MODELS:
    sub = os.path.join(folder, name)
    if not paths.isdir(sub):
      raise CheckpointError(f"{folder}: pipeline component folder {name}/ is missing")
    kwargs = unet_kwargs if name == "unet" else {}
    modules[name], params[name] = load_component(sub, dtype=dtype, param_dtype=param_dtype,
                                                 variant=variant, **kwargs)
  tok_dir = os.path.join(folder, "tokenizer")
  tokenizer = tokenizers.load(tok_dir if paths.isdir(tok_dir) else None)
  sched = os.path.join(folder, "scheduler", "scheduler_config.json")
  scheduler_config = _read_json(sched) if paths.isfile(sched) else {}
  return PipelineParts(modules, params, tokenizer, scheduler_config, index)


def save_pipeline(path: str, parts: PipelineParts, *, dtype: Any = None) -> None:
  """Writes a folder that diffusers' PyTorch pipelines (and :func:`load_pipeline`) load."""
  os.makedirs(path, exist_ok=True)
  for name in PIPELINE_MODELS:
    save_component(os.path.join(path, name), parts.modules[name], parts.params[name], dtype=dtype)
  parts.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
  if parts.scheduler_config:
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    _write_json(os.path.join(path, "scheduler", "scheduler_config.json"), parts.scheduler_config)
  index = dict(parts.model_index)
  index.update({
      "_diffusers_version": _version("diffusers", "0.42.0"),
      "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": ["transformers",
                       formats.kind_of_config_object(parts.modules["text_encoder"].config,
                                                     parts.modules["text_encoder"]).class_name],
      "tokenizer": ["transformers", "CLIPTokenizer"],
  })
  if parts.scheduler_config:
    index["scheduler"] = ["diffusers", parts.scheduler_config.get("_class_name",
                                                                 "EulerAncestralDiscreteScheduler")]
  # a pipeline built in code has no index yet: an 8-channel UNet (noisy + image latents)
  # is an editor, anything else a text-to-image model
  unet = parts.modules["unet"].config
  index.setdefault("_class_name", "StableDiffusionInstructPix2PixPipeline"
                   if unet.in_channels == 2 * unet.out_channels else "StableDiffusionPipeline")
  for optional in ("safety_checker", "feature_extractor", "image_encoder"):
    index.setdefault(optional, [None, None])
  index.setdefault("requires_safety_checker", False)
  _write_json(os.path.join(path, "model_index.json"), index)
