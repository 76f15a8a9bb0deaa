"""The CPU benchmarks behind BENCHMARKS.md run end to end at a tiny size, against their
PyTorch reference, so that they cannot rot between the sessions that publish numbers
(``train_benchmark.py`` once did: a config key the optimizer came to need). Nothing
here is timed: the assertions are only that each prints its comparison."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,args,row", [
    ("train_benchmark.py", ["--size", "tiny", "--resolution", "32", "--batch", "2",
                            "--repeats", "1"], r"ratio ours/theirs = \d+\.\d\d"),
    ("edit_benchmark.py", ["--size", "tiny", "--resolution", "32", "--steps", "2", "--batch", "1",
                           "--repeats", "1"], r"^\s+1 \|\s+\d+\.\d+ \|\s+\d+\.\d+ \|\s+\d+\.\d\d"),
    ("attention_benchmark.py", ["--shape", "2", "64", "2", "8", "--repeats", "1"],
     r"^default \| \d+\.\d+ \| \d+\.\d+ \| \d+\.\d\d \| \d+\.\d\d"),
])
def test_cpu_benchmark_runs_tiny_beside_pytorch(script, args, row):
  env = dict(os.environ, JAX_PLATFORMS="cpu", IP2P_COMPILATION_CACHE="off")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(row, out.stdout, re.M), out.stdout
