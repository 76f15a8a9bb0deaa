"""Where the milliseconds of a compiled program go, by kind of work, on XLA:CPU.

  python benchmarks/profile_ops.py train --size small --resolution 64 --batch 8
  python benchmarks/profile_ops.py edit --size small --resolution 128 --batch 1 --steps 10

Runs the program of ``train_benchmark.py`` (one stage-2 step) or of
``edit_benchmark.py`` (one edit) a few times under ``jax.profiler`` with XLA's
per-op trace events on (``--xla_cpu_enable_xprof_traceme``), and adds up each HLO
instruction's self time (its trace events minus those nested in it), on every XLA
thread; the optimised HLO comes from XLA's dump (``--xla_dump_to``). Each instruction is put in a group by the JAX name stack in its metadata
(the flax module path and the primitive): convolution, attention core
(``Attention.attend``), attention projections, normalisation, dense layers, the
frozen VAE and text encoder, and the rest. Prints milliseconds per run of each group
and the heaviest instructions, with wall time per run for scale (thread time can
exceed it when XLA runs work on both cores).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

DUMP = tempfile.mkdtemp()
os.environ["IP2P_COMPILATION_CACHE"] = "off"  # a program read from the cache is not dumped
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
                           f" --xla_dump_to={DUMP} --xla_dump_hlo_as_text").strip()

import numpy as np  # noqa: E402

from common import SIZES, machine  # noqa: E402

GROUPS = (  # (group, test on the op_name metadata), first match wins
    ("VAE (frozen / decode)", lambda n: "AutoencoderKL" in n),
    ("text encoder (frozen)", lambda n: "CLIPText" in n),
    ("attention core (attend)", lambda n: ".attend" in n),
    ("convolution", lambda n: n.endswith("conv_general_dilated")  # XLA's, or the C++ kernel's
     or re.search(r"/conv(\d|_in|_out|_shortcut)?/ffi_call$", n) is not None
     or n.endswith("conv_shortcut/dot_general")),  # a 1x1 convolution as a product
    ("attention projections", lambda n: re.search(r"/attn[12]/", n) is not None),
    ("normalisation", lambda n: re.search(r"/(norm\d?|conv_norm_out)/", n) is not None),
    ("feed-forward", lambda n: "/ff/" in n),
    ("dense (time embedding, proj)", lambda n: n.endswith("dot_general")),
    ("UNet other (activations, residuals, copies)", lambda n: "UNet2DConditionModel" in n),
)
OTHER = "outside the networks (optimizer, EMA, loss, sampler)"
UNNAMED = "layout copies XLA inserted (no source op)"


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its ``op_name`` metadata, from a compiled module's text; a
  fusion without one takes that of the first instruction inside it that has one, or
  "conv_general_dilated" if it holds a convolution (XLA keeps no metadata on the
  convolutions of weight gradients)."""
  own, calls, first_in, convolves = {}, {}, {}, set()
  computation = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
    if header:
      computation = header.group(1)
      continue
    m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
    if not m:
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    own[m.group(1)] = name.group(1) if name else ""
    if " convolution(" in line and computation is not None:
      convolves.add(computation)
    if name and computation is not None:
      first_in.setdefault(computation, name.group(1))
    called = re.search(r"calls=%?([\w.\-]+)", line)
    if called:
      calls[m.group(1)] = called.group(1)
  inherited = lambda k: first_in.get(calls.get(k, ""), "") or (
      "conv_general_dilated" if calls.get(k) in convolves else "")
  return {k: v or inherited(k) for k, v in own.items()}


def group_of(op_name: str) -> str:
  if not op_name:
    return UNNAMED
  for group, test in GROUPS:
    if test(op_name):
      return group
  return OTHER


def self_times(xplane: str) -> dict[tuple[str, str], float]:
  """Nanoseconds of self time per (HLO module, instruction) over all XLA threads."""
  from jax._src.lib import _profile_data
  data = _profile_data.ProfileData.from_file(xplane)
  totals: dict[tuple[str, str], float] = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      events = []
      for e in line.events:
        stats = dict(e.stats)
        if "hlo_op" in stats:
          events.append((e.start_ns, e.start_ns + e.duration_ns,
                         (stats.get("hlo_module", ""), stats["hlo_op"])))
      events.sort(key=lambda e: (e[0], -e[1]))
      stack: list[list] = []  # [end, key, child time]
      for start, end, key in events:
        while stack and stack[-1][0] <= start:
          done = stack.pop()
          totals[done[1]] -= done[2]
        if stack:
          stack[-1][2] += end - start
        totals[key] += end - start
        stack.append([end, key, 0.0])
      for done in stack:
        totals[done[1]] -= done[2]
  return totals


def profile(run, runs: int, top: int) -> None:
  import jax
  run()
  wall = min(_timed(run) for _ in range(2))
  known: dict[tuple[str, str], str] = {}
  for path in glob.glob(os.path.join(DUMP, "*.cpu_after_optimizations.txt")):
    module = os.path.basename(path).split(".")[1]
    with open(path) as f:
      known.update({(module, op): name for op, name in op_names(f.read()).items()})
  folder = tempfile.mkdtemp()
  with jax.profiler.trace(folder):
    for _ in range(runs):
      run()
  xplane = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
  per_op = {k: v / runs / 1e6 for k, v in self_times(xplane).items()}
  groups: dict[str, float] = collections.defaultdict(float)
  for key, ms in per_op.items():
    groups[group_of(known.get(key, ""))] += ms
  total = sum(groups.values())
  print(f"wall {wall * 1e3:.1f} ms per run (untraced); XLA thread time {total:.1f} ms per run")
  print("| group | ms per run | share |")
  print("|---|---:|---:|")
  for group, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
    print(f"| {group} | {ms:.1f} | {ms / total:.0%} |")
  print("by kind of instruction (ms per run): " + by_kind(per_op.items(), 12))
  print("heaviest instructions of each group (ms per run):")
  for group in sorted(groups, key=lambda g: -groups[g]):
    ops = sorted((kv for kv in per_op.items() if group_of(known.get(kv[0], "")) == group),
                 key=lambda kv: -kv[1])
    print(f"  {group} (by kind: {by_kind(ops, 5)}):")
    for key, ms in ops[:top]:
      print(f"    {ms:7.2f}  {key[1]}  {known.get(key, '')[-100:]}")


def by_kind(ops, count: int) -> str:
  """The milliseconds of ``(key, ms)`` pairs summed by instruction kind (an instruction's
  name without its number), the ``count`` largest."""
  kinds: dict[str, float] = collections.defaultdict(float)
  for key, ms in ops:
    kinds[re.sub(r"\.\d+$", "", key[1])] += ms
  return ", ".join(f"{kind} {ms:.1f}"
                   for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:count])


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def main():
  p = argparse.ArgumentParser()
  p.add_argument("program", choices=["train", "edit"])
  p.add_argument("--size", choices=sorted(SIZES), default="small")
  p.add_argument("--resolution", type=int, default=0, help="0: 64 (train), 128 (edit)")
  p.add_argument("--batch", type=int, default=0, help="0: 8 (train), 1 (edit)")
  p.add_argument("--steps", type=int, default=10, help="edit: sampler steps")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--top", type=int, default=4, help="instructions listed per group")
  args = p.parse_args()
  print(f"machine: {machine()}")
  if args.program == "train":
    import train_benchmark
    _, parts, batch = train_benchmark.setup(args.size, args.resolution or 64, args.batch or 8)
    run = train_benchmark.our_step(parts, batch)
  else:
    import edit_benchmark
    _, ours = edit_benchmark.setup(args.size)
    run = edit_benchmark.our_edit(ours, args.resolution or 128, args.batch or 1, args.steps)
  profile(run, args.runs, args.top)


if __name__ == "__main__":
  sys.exit(main())
