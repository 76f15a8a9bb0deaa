"""Reading model configs from the ``config.json`` of diffusers/transformers folders.

Each model has a frozen dataclass whose field names are the on-disk keys. A key
is one of:
  * a field: read (lists become tuples so configs stay hashable Module fields) and
    checked against the field's type, so ``"block_out_channels": "abc"`` is a
    :class:`ConfigError` naming the key, not a crash deep inside the model;
  * *unsupported*: accepted only at the one value we implement; any other value
    is a :class:`ConfigError` naming the key (e.g. SDXL's ``addition_embed_type``);
  * *ignored*: bookkeeping with no effect on the outputs (versions, dtypes);
  * anything else: a warning naming the key, so nothing is dropped silently.
"""
from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A config.json asks for something this implementation does not support."""


def _freeze(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


def matches(value: Any, hint: Any) -> bool:
  """Whether a JSON value fits a field annotation: ``int``, ``float`` (ints too),
  ``bool``, ``str``, ``None``, unions and ``tuple[X, ...]`` (a JSON list)."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return any(matches(value, h) for h in typing.get_args(hint))
  if origin is tuple:
    args = typing.get_args(hint)
    if not isinstance(value, (list, tuple)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(matches(v, args[0]) for v in value)
    return len(value) == len(args) and all(matches(v, h) for v, h in zip(value, args))
  if hint is type(None) or hint is None:
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  return True  # nested configs and other types are checked by their own parser


def _type_name(hint: Any) -> str:
  """``tuple[int, ...] | int`` -> "a list of int or int"."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_type_name(h) for h in typing.get_args(hint))
  if origin is tuple:
    return f"a list of {_type_name(typing.get_args(hint)[0])}"
  if hint is type(None):
    return "null"
  return getattr(hint, "__name__", str(hint))


def parse_config(cls: type[T], raw: Mapping[str, Any], *, component: str,
                 unsupported: Mapping[str, Any] = (), ignored: frozenset[str] = frozenset()) -> T:
  """Builds ``cls`` from a config dict, refusing unsupported options and values of the
  wrong type by name."""
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{component}: the config must be a JSON object ({{\"key\": value, ...}}), "
                      f"got {type(raw).__name__}")
  hints = typing.get_type_hints(cls)
  fields = {f.name for f in dataclasses.fields(cls)}
  unsupported = dict(unsupported)
  kwargs, unknown = {}, []
  for key, value in raw.items():
    if key in fields:
      if not matches(value, hints[key]):
        raise ConfigError(f"{component}: config key {key!r} = {value!r} must be "
                          f"{_type_name(hints[key])}")
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
