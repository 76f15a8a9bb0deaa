"""Configs: model shapes (``models``) and, per job, ml_collections ``get_config`` files.

Installed with the package as ``ip2p_jax.configs`` (``from ip2p_jax.configs.tiny_ip2p import
get_config`` works outside the repository), and importable as ``configs`` from the
repository root, where ``--config=configs/tiny_ip2p.py`` paths point. Every config is a
locked ``ConfigDict``: assigning a key it does not have (a typo) is an error.
"""
import importlib.util
import sys

if __name__ == "ip2p_jax.configs" and importlib.util.find_spec("configs") is None:
  # Outside the repository the config files' own `from configs import ...` lines resolve to
  # this package (only when no other top-level `configs` exists).
  sys.modules["configs"] = sys.modules[__name__]
