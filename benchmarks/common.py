"""Shared pieces of the benchmarks: random diffusers pipelines of a few sizes, timing."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    # name: (UNet block_out_channels, layers_per_block, cross_attention_dim, heads,
    #        VAE block_out_channels, text hidden size, text layers)
    "tiny": ((32, 64), 1, 32, 4, (16, 32), 32, 2),
    "small": ((64, 128, 256), 2, 256, 8, (32, 64, 128), 256, 4),
    "sd15": ((320, 640, 1280, 1280), 2, 768, 8, (128, 256, 512, 512), 768, 12),
}


def diffusers_ip2p(size: str, in_channels: int = 8, seed: int = 0):
  """A StableDiffusionInstructPix2PixPipeline with random weights of the given size."""
  import diffusers
  import torch
  import transformers
  from ip2p_jax import tokenizer as tokenizers
  unet_ch, layers, ctx, heads, vae_ch, text_d, text_layers = SIZES[size]
  n = len(unet_ch)
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=unet_ch, layers_per_block=layers, in_channels=in_channels,
      out_channels=4, cross_attention_dim=ctx, attention_head_dim=heads,
      down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
      norm_num_groups=min(32, unet_ch[0] // 2))
  vae = diffusers.AutoencoderKL(
      block_out_channels=vae_ch, layers_per_block=2 if size == "sd15" else 1, latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * len(vae_ch),
      up_block_types=("UpDecoderBlock2D",) * len(vae_ch), norm_num_groups=min(32, vae_ch[0] // 2))
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      hidden_size=text_d, intermediate_size=4 * text_d, num_hidden_layers=text_layers,
      num_attention_heads=max(1, text_d // 64), projection_dim=text_d))
  return diffusers.StableDiffusionInstructPix2PixPipeline(
      unet=unet.eval(), vae=vae.eval(), text_encoder=text.eval(),
      tokenizer=tokenizers.transformers_tokenizer(),
      scheduler=diffusers.EulerAncestralDiscreteScheduler(
          beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          timestep_spacing="leading", steps_offset=1),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def best_of(fn, repeats: int, clock=time.perf_counter) -> float:
  """The least time of ``repeats`` calls. ``clock=time.process_time`` counts the
  process's CPU seconds instead of wall seconds: with one thread (``taskset -c 0``)
  that is the work itself, whatever else shares the cores."""
  times = []
  for _ in range(repeats):
    t = clock()
    fn()
    times.append(clock() - t)
  return min(times)


def best_of_both(ours, theirs, repeats: int) -> tuple[float, float]:
  """The least time of ``repeats`` calls of each, the calls alternating (ours, theirs,
  ours, ...) so that a slower or faster spell of the machine falls on both; a pause
  before each call lets the other's idle pool threads (XLA's spin before they sleep)
  leave the cores."""
  times = ([], [])
  for _ in range(repeats):
    for fn, out in zip((ours, theirs), times):
      time.sleep(0.5)
      t = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t)
  return min(times[0]), min(times[1])


def machine() -> str:
  """The machine in a line: CPU model and vector extension (the kernels' width follows
  it), cores, jax and its device."""
  import jax
  model, vectors = platform.processor() or platform.machine(), ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      info = f.read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), model)
    vectors = ", AVX-512" if " avx512f" in info else ", AVX2" if " avx2" in info else ""
  except OSError:
    pass
  return (f"{model}{vectors}, {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}")


def reference_seconds(name: str, measure, *args) -> float | None:
  """``measure(*args)``, the PyTorch reference's seconds, or None where it fails (the
  reason on stderr): a failing reference must not lose our numbers."""
  try:
    return measure(*args)
  except Exception as e:  # noqa: BLE001 -- any failure of the reference, reported
    print(f"# {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return None


@contextlib.contextmanager
def exclusive_device():
  """Holds the lock file named by ``$IP2P_DEVICE_LOCK`` (if set) for a timed section, so
  benchmarks that share one accelerator (compiling side by side) never time at once."""
  path = os.environ.get("IP2P_DEVICE_LOCK")
  if not path:
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def host_random_params(module, seed: int = 0):
  """Random weights of ``module``'s real shapes (``checkpoints.abstract_params``) drawn
  on the host with numpy (norm scales 1, biases 0, other weights N(0, 0.02)) and put on
  the default device. The benchmarks time the models, not their initialisers: on an
  H200, ``jax.jit`` of an SD 1.5 UNet's ``init`` took 140-200 s to compile and the
  encoders' eager init 48 s."""
  import jax
  import numpy as np

  from ip2p_jax.checkpoints import abstract_params
  shapes = abstract_params(module)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", "")
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)
  return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


_COUNT_UNET_FLOPS = """
import json, sys
import jax, jax.numpy as jnp
from ip2p_jax.checkpoints import abstract_params, module_from_config
spec = json.loads(sys.argv[1])
unet = module_from_config(spec["config"], dtype=jnp.dtype(spec["dtype"]),
                          param_dtype=jnp.dtype(spec["param_dtype"]), attention_implementation="xla")
b, n, c = spec["batch"], spec["latent"], spec["config"]
x = jax.ShapeDtypeStruct((b, n, n, c["in_channels"]), unet.dtype)
t = jax.ShapeDtypeStruct((b,), jnp.int32)
ctx = jax.ShapeDtypeStruct((b, 77, c["cross_attention_dim"]), unet.dtype)
call = lambda p, x, t, ctx: jnp.mean(unet.apply({"params": p}, x, t, ctx).astype(jnp.float32))
fn = jax.grad(call) if spec["backward"] else call
cost = jax.jit(fn).lower(abstract_params(unet), x, t, ctx).cost_analysis()
print((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
"""


class UnetFlops:
  """FLOPs of one UNet call (with its backward pass if ``backward``) on ``batch`` latents
  of ``latent`` x ``latent``, from XLA's cost analysis of the program lowered for a CPU,
  in a CPU-only subprocess on abstract shapes: nothing is compiled or allocated, and
  attention is counted as XLA's kernel whichever kernel the timed program ran (cuDNN's
  calls are opaque to the cost analysis). In a GPU process, jax 0.11.2's lowered
  programs, for the GPU or for the CPU, give no cost analysis (the 2026-11-28 lease).
  The count starts when the object is made (tracing an SD 1.5 UNet takes ~20 s, which
  overlaps the timed program's compilation); ``value()`` waits for it."""

  def __init__(self, unet_config: dict, batch: int, latent: int, *, dtype: str,
               param_dtype: str, backward: bool):
    spec = {"config": unet_config, "batch": batch, "latent": latent, "dtype": dtype,
            "param_dtype": param_dtype, "backward": backward}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    self._process = subprocess.Popen([sys.executable, "-c", _COUNT_UNET_FLOPS, json.dumps(spec)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)

  def value(self) -> float:
    out, err = self._process.communicate()
    if self._process.returncode:
      raise RuntimeError(f"counting the UNet's FLOPs failed:\n{err[-2000:]}")
    return float(out.split()[-1])
