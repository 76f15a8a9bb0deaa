"""Reading model configs from the ``config.json`` of diffusers/transformers folders.

Each model has a frozen dataclass whose field names are the on-disk keys. A key
is one of:
  * a field: read (lists become tuples so configs stay hashable Module fields);
  * *unsupported*: accepted only at the one value we implement; any other value
    is a :class:`ConfigError` naming the key (e.g. SDXL's ``addition_embed_type``);
  * *ignored*: bookkeeping with no effect on the outputs (versions, dtypes);
  * anything else: a warning naming the key, so nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config.json asks for something this implementation does not support."""


def _freeze(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


def parse_config(cls: type[T], raw: Mapping[str, Any], *, component: str,
                 unsupported: Mapping[str, Any] = (), ignored: frozenset[str] = frozenset()) -> T:
  """Builds ``cls`` from a config dict, refusing unsupported options by name."""
  fields = {f.name for f in dataclasses.fields(cls)}
  unsupported = dict(unsupported)
  kwargs, unknown = {}, []
  for key, value in raw.items():
    if key in fields:
      kwargs[key] = _freeze(value)
    elif key in unsupported:
      if _freeze(value) != unsupported[key]:
        raise ConfigError(
            f"{component}: config key {key!r} = {value!r} is not supported "
            f"(only {unsupported[key]!r}); this model is not a Stable Diffusion 1.x/2.x-family "
            f"{component}.")
    elif not key.startswith("_") and key not in ignored:
      unknown.append(key)
  if unknown:
    warnings.warn(f"{component}: ignoring unknown config keys {sorted(unknown)}", stacklevel=3)
  return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
  """The dataclass as JSON-ready dict (tuples become lists)."""
  def thaw(v):
    return [thaw(x) for x in v] if isinstance(v, tuple) else v
  return {k: thaw(v) for k, v in dataclasses.asdict(config).items()}
