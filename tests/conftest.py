"""Shared fixtures: tiny PyTorch reference models built with diffusers/transformers."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# The library turns JAX's persistent compilation cache on; tests keep it out of ~/.cache
# (tests of the cache itself set their own folder).
os.environ.setdefault("IP2P_COMPILATION_CACHE", "off")
# One persistent compilation cache shared by every process of the run (pytest's workers and
# the processes they start), so a program compiled by one test is loaded by the next: most
# of the suite's time is compiling the same tiny training and sampling programs again. A
# loaded program computes bit for bit what a fresh compile does (checked: a 5-step tiny
# training, 210 arrays equal). Only programs that took JAX's default 1 s to compile are
# kept (train steps, inits, samplers), not the thousands of small op-by-op ones. No size
# limit: with one, JAX scans the whole folder on every write (+0.3 s a write at 9,000
# files, measured), which made the suite 50% slower. Multi-process (jax.distributed) tests
# run without it (``helpers.xla_env.without_shared_cache``), as do the tests of ip2p's own
# cache folder.
if "IP2P_TEST_XLA_CACHE" not in os.environ:
  import tempfile
  os.environ["IP2P_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="ip2p-test-xla-")
  _OWN_CACHE = os.environ["IP2P_TEST_XLA_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["IP2P_TEST_XLA_CACHE"]
# Compile-time flags for this process and every process the tests start (before jax loads).
from helpers.xla_env import xla_flags  # noqa: E402

os.environ["XLA_FLAGS"] = xla_flags()
warnings.filterwarnings("ignore", category=FutureWarning)

import numpy as np
import pytest


def randomize_(model, seed: int = 0):
  """Gives every parameter of a torch model non-trivial values (norm scales away
  from 1, biases away from 0), so a transposed or swapped tensor cannot go unnoticed."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and ("norm" in name or "layrnorm" in name) and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim <= 1:
        p.copy_(0.1 * noise)
  return model


def nchw(x: np.ndarray) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def nhwc(x) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def perturb_params(params, seed: int = 0, scale: float = 0.05):
  """Our params plus noise: a random model for the save-and-load-in-PyTorch direction."""
  import jax
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      l + scale * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


@pytest.fixture(scope="session")
def rng():
  return np.random.default_rng(0)


@pytest.fixture(scope="session")
def model(tmp_path_factory):
  """A tiny InstructPix2Pix pipeline folder saved by diffusers, shared by the editing tests."""
  from pipeline_fixtures import save_ip2p
  folder = tmp_path_factory.mktemp("ip2p_model")
  save_ip2p(folder)
  return str(folder)


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory):
  """One small shapes world (32 px, 32 train + 4 held-out triplets) shared by the
  in-process training runs."""
  from ip2p_jax.data import builders
  out = tmp_path_factory.mktemp("data")
  path, _ = builders.build("shapes_world", str(out), builders.ShapesWorldConfig(
      name="t", size=32, num_train=32, num_heldout=4, seed=0))
  return path


def pytest_unconfigure(config):
  """The process that made the shared compilation cache (pytest's controller) removes it."""
  if "_OWN_CACHE" in globals() and not hasattr(config, "workerinput"):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
