"""Lazy package exports (PEP 562): a package names what it exports and from where, and
the module behind a name is imported on first use. So ``ip2p --help`` and a mistyped
argument answer without importing JAX (about 1.5 s on a 2-core CPU), while ``from
ip2p_jax import InstructPix2PixPipeline`` works as before."""
from __future__ import annotations

import importlib
from typing import Callable


def exports(package: str, names: dict[str, str]) -> tuple[Callable, Callable]:
  """``(__getattr__, __dir__)`` for ``package``; ``names`` maps each exported name to the
  submodule (relative to ``package``) that defines it, or to ``""`` when the name is
  itself a submodule."""
  def get(name: str):
    if name not in names:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    source = names[name]
    if not source:
      return importlib.import_module(f"{package}.{name}")
    return getattr(importlib.import_module(f"{package}.{source}"), name)

  def listing() -> list[str]:
    return sorted(set(importlib.import_module(package).__dict__) | set(names))
  return get, listing
