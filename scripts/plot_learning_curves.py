"""The default model's learning curves: held-out edit success and PSNR outside the
edited region (``eval/...`` records of metrics.jsonl) against training step, for stage 2
from the stage-1 UNet and from a random UNet (the paper's claim that stage 1 matters),
and, where their folders are kept, the earlier run on SD's schedule (nonzero terminal
SNR) and the object-weighted continuation (``focus``, 64 held-out edits per point);
and stage 1's: how often held-out captions are drawn right (``eval/t2i/...``, judged by
colour with ``ip2p_jax.metrics.scene_match``).

  python scripts/plot_learning_curves.py [--runs runs/default] [-o examples/default_model_learning_curves.png]

With ``--gpu METRICS.jsonl [--before EVAL.json] [--after EVAL.json]``: instead, the curve
of a GPU continuation of the shipped stage 2 (``scripts/gpu_default_model.sh``, 64 held-out
edits at 20 steps per point) against examples seen since stage 2 began, with the 200-example
``ip2p eval`` of the model it started from and of its export as squares.

  python scripts/plot_learning_curves.py --gpu runs/gpu/cont/metrics.jsonl \
    --before runs/default/eval/eval.json --after runs/gpu/cont/eval/eval.json \
    -o examples/default_model_gpu_curve.png
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("success", "all edits"), ("success/recolor", "recolour"),
          ("success/background", "background"))
# (folder, label, line style, step offset: a run continued from another's export)
RUNS = (("ip2p", "from stage 1", "-", 0), ("scratch", "from a random UNet", "--", 0),
        ("ip2p_leak", "SD schedule (signal leak)", ":", 0),
        ("focus", "objects weighed up, from step 6500 (not kept)", "-.", 6500))


def read_evals(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if "eval/success" in r]


def plot_stage_1(ax, path: str, colors) -> None:
  """Stage 1's held-out captions: background right, object colours right, both."""
  records = []
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      records = [r for r in map(json.loads, f) if "eval/t2i/depicts" in r]
  for (key, name), color in zip((("background", "background"), ("colours", "object colours"),
                                 ("depicts", "both")), colors):
    points = [(r["step"], r[f"eval/t2i/{key}"]) for r in records]
    if points:
      steps, values = zip(*points)
      ax.plot(steps, values, "-", color=color, marker="o", markersize=3, label=name)
  ax.set_xlabel("stage-1 training step (batch 32)")
  ax.set_ylabel("share of 32 held-out captions drawn right")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center right")
  ax.set_title("stage 1: captions drawn (colour judge)")


def plot_continuation(metrics: str, before: str | None, after: str | None, output: str,
                      *, start_examples: int = 7250 * 32, batch: int = 256) -> None:
  """Held-out success (all, recolour, background) and PSNR outside the edit of a run
  continued from the shipped stage 2 (``start_examples`` seen, ``batch`` a step)."""
  fig, (ax, ax_psnr) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  records = read_evals(metrics)
  with open(metrics, encoding="utf-8") as f:
    last_step = max(json.loads(line)["step"] for line in f if line.strip())
  x = lambda step: (start_examples + step * batch) / 1e6
  for (key, name), color in zip(CURVES, colors):
    points = [(x(r["step"]), r[f"eval/{key}"]) for r in records if f"eval/{key}" in r]
    if points:
      ax.plot(*zip(*points), "-", color=color, marker="o", markersize=3, label=name)
  ax_psnr.plot([x(r["step"]) for r in records], [r["eval/psnr_outside"] for r in records],
               "-", color="k", marker="o", markersize=3, label="64 held-out edits, 20 steps")
  for path, step in ((before, 0), (after, last_step)):
    if path and os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        report = json.load(f)
      kinds = report["per_edit_type"]
      values = (report["overall"]["success"], kinds.get("recolor", {}).get("success"),
                kinds.get("background", {}).get("success"))
      for value, color in zip(values, colors):
        if value is not None:
          ax.plot([x(step)], [value], "s", color=color, markersize=7, markeredgecolor="k")
      ax_psnr.plot([x(step)], [report["overall"]["psnr_outside"]], "s", color="w",
                   markeredgecolor="k", markersize=7)
  ax.plot([], [], "s", color="w", markeredgecolor="k", label="ip2p eval, 200 edits, 50 steps")
  ax_psnr.plot([], [], "s", color="w", markeredgecolor="k", label="ip2p eval, 200 edits")
  for a in (ax, ax_psnr):
    a.set_xlabel(f"stage-2 examples seen (millions; the GPU run starts at {x(0):.3f})")
    a.grid(alpha=0.3)
    a.legend(fontsize=7, loc="upper left")
  ax.set_ylabel("held-out success")
  ax.set_ylim(0, 1)
  ax.axhline(0.9, color="gray", lw=0.8, ls="--")
  ax.set_title("held-out success (circles: 64 edits, only a few of each type;\n"
               "bar for recolour and background: 90%)", fontsize=10)
  ax_psnr.set_ylabel("PSNR outside the edited region (dB)")
  ax_psnr.axhline(25, color="gray", lw=0.8, ls="--")
  ax_psnr.set_title("keeping the rest of the picture (bar: 25 dB)")
  fig.tight_layout()
  fig.savefig(output)
  print(f"wrote {output}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/default")
  parser.add_argument("-o", "--output", default="examples/default_model_learning_curves.png")
  parser.add_argument("--gpu", help="metrics.jsonl of a GPU continuation of stage 2")
  parser.add_argument("--before", help="eval.json of the model the continuation started from")
  parser.add_argument("--after", help="eval.json of the continuation's export")
  args = parser.parse_args()
  if args.gpu:
    plot_continuation(args.gpu, args.before, args.after, args.output)
    return
  fig, (ax, ax_psnr, ax_t2i) = plt.subplots(1, 3, figsize=(17, 4.4), dpi=110)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for run, label, style, offset in RUNS:
    path = os.path.join(args.runs, run, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    records = read_evals(path)
    for (key, name), color in zip(CURVES, colors):
      points = [(r["step"] + offset, r[f"eval/{key}"]) for r in records if f"eval/{key}" in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, style, color=color, marker="o", markersize=3,
                label=f"{name}, {label}")
    points = [(r["step"] + offset, r["eval/psnr_outside"]) for r in records
              if "eval/psnr_outside" in r]
    if points:
      steps, values = zip(*points)
      ax_psnr.plot(steps, values, style, color="k", marker="o", markersize=3, label=label)
  ax.set_xlabel("stage-2 training step (batch 32)")
  ax.set_ylabel("held-out success")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", ncol=2)
  ax.set_title("held-out edit success")
  ax_psnr.set_xlabel("stage-2 training step (batch 32)")
  ax_psnr.set_ylabel("PSNR outside the edited region (dB)")
  ax_psnr.axhline(25, color="gray", lw=0.8, ls="--")
  ax_psnr.grid(alpha=0.3)
  ax_psnr.legend(fontsize=7, loc="lower right")
  ax_psnr.set_title("keeping the rest of the picture (bar: 25 dB)")
  plot_stage_1(ax_t2i, os.path.join(args.runs, "t2i", "metrics.jsonl"), colors)
  fig.tight_layout()
  fig.savefig(args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
