"""The GPU benchmark scripts run end to end on CPU at a tiny size (--tiny), so that the
one-command GPU run cannot rot between the sessions that have a GPU."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,args", [
    ("gpu_train_sd15.py", ["--batch", "2", "--resolution", "32", "--steps", "1"]),
    ("gpu_edit_sd15.py", ["--batch", "1", "--resolution", "32", "--steps", "2", "--repeats", "1"]),
])
def test_gpu_benchmark_runs_tiny_on_cpu(script, args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", IP2P_COMPILATION_CACHE="off")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--tiny",
                        "--no-torch", *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [line for line in out.stdout.splitlines() if line.startswith(f"| {args[1]} |")]
  assert len(rows) == 1, out.stdout


def test_unet_flops_counted_in_a_cpu_subprocess_equal_the_in_process_count():
  """The benchmarks' MFU numerator: XLA's cost analysis of the UNet call (and of its
  gradient) lowered for the CPU in a CPU-only subprocess equals the same count made here."""
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
  from common import UnetFlops
  from configs import models
  from ip2p_jax.checkpoints import abstract_params, module_from_config
  config = dict(models.TINY_IP2P_UNET)
  unet = module_from_config(config, attention_implementation="xla")
  x = jax.ShapeDtypeStruct((3, 8, 8, config["in_channels"]), jnp.float32)
  t = jax.ShapeDtypeStruct((3,), jnp.int32)
  ctx = jax.ShapeDtypeStruct((3, 77, config["cross_attention_dim"]), jnp.float32)
  call = lambda p, x, t, c: jnp.mean(unet.apply({"params": p}, x, t, c))
  for backward, fn in ((False, call), (True, jax.grad(call))):
    want = jax.jit(fn).lower(abstract_params(unet), x, t, ctx).cost_analysis()
    want = (want[0] if isinstance(want, (list, tuple)) else want)["flops"]
    got = UnetFlops(config, 3, 8, dtype="float32", param_dtype="float32",
                    backward=backward).value()
    assert got == want > 0
