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
