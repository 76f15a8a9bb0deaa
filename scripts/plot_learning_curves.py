"""The default model's learning curves: held-out edit success (``eval/...`` records of
metrics.jsonl) against training step, for stage 2 from the stage-1 UNet and from a
random UNet (the paper's claim that stage 1 matters), on one plot.

  python scripts/plot_learning_curves.py [--runs runs/default] [-o examples/default_model_learning_curves.png]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("success", "all edits"), ("success/recolor", "recolour"),
          ("success/background", "background"))
RUNS = (("ip2p", "from stage 1", "-"), ("scratch", "from a random UNet", "--"))


def read_evals(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [r for r in map(json.loads, f) if "eval/success" in r]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/default")
  parser.add_argument("-o", "--output", default="examples/default_model_learning_curves.png")
  args = parser.parse_args()
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for run, label, style in RUNS:
    path = os.path.join(args.runs, run, "metrics.jsonl")
    if not os.path.isfile(path):
      continue
    records = read_evals(path)
    for (key, name), color in zip(CURVES, colors):
      points = [(r["step"], r[f"eval/{key}"]) for r in records if f"eval/{key}" in r]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, values, style, color=color, marker="o", markersize=3,
                label=f"{name}, {label}")
  ax.set_xlabel("stage-2 training step (batch 32)")
  ax.set_ylabel("held-out success")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title("Default model: held-out edit success while training")
  fig.tight_layout()
  fig.savefig(args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
