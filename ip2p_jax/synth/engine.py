"""The data engine as one job: captions -> instructions -> pairs -> CLIP filter -> a folder.

The folder is the original's format, which ``ip2p data import --format ip2p-folder``
reads::

    OUT/seeds.json               [[prompt folder, [kept seed, ...]], ...], sorted
    OUT/0000007/prompt.json      {"caption", "input", "edit", "output", "index"}
    OUT/0000007/{seed}_0.jpg     the first image of a kept pair, {seed}_1.jpg the second
    OUT/0000007/metadata.jsonl   one line per generated sample: seed, p, cfg_scale,
                                 clip_sim_0/1/dir/image, kept, rejected_by, and for
                                 shapes-world captions the colour judge's verdicts
                                 (``metrics.scene_match``): edit (the change the two
                                 captions differ by), follows_edit (the pair shows it;
                                 null: not judged from colours), depicts_input (the first
                                 image shows the caption; null under an effect)
    OUT/synth_config.json        the settings; a resumed run must use the same
    OUT/synth_report.json        counts (also returned and printed by ``ip2p synth``)
    OUT/contact_sheet.png        kept and rejected pairs of this run, labelled

Prompt ``i`` (the caption's position in the file) is done when its ``prompt.json``
exists: it is written last, and every file atomically, so a killed run is resumed by
running the same command again. Seeds, ``p`` and guidance scales are drawn from
``(seed, i)`` (``prompt_to_prompt.draw``) and instructions are deterministic in
``(seed, i)``, so a resumed run makes the data an uninterrupted one would have.
"""
from __future__ import annotations

import collections
import glob
import io
import json
import os
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ip2p_jax.atomic import TMP_PREFIX, atomic_write
from ip2p_jax.metrics import scene_match
from ip2p_jax.synth import prompt_to_prompt
from ip2p_jax.synth.clip_filter import METADATA_KEYS, ClipFilter
from ip2p_jax.synth.config import SynthConfig
from ip2p_jax.synth.instructions import parse_shapes_caption

SHEET_ROWS = 8  # kept and rejected pairs each on the contact sheet


def read_captions(path: str) -> list[str]:
  """One caption per line; blank lines are skipped (they take no index)."""
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def folder_name(index: int) -> str:
  return f"{index:07d}"


def _jpeg(image: np.ndarray, quality: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
  return buf.getvalue()


def _write_json(path: str, value) -> None:
  with atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)


def _remove_partial_writes(out: str) -> None:
  for path in glob.glob(os.path.join(out, TMP_PREFIX + "*")) + \
      glob.glob(os.path.join(out, "*", TMP_PREFIX + "*")):
    os.unlink(path)


def _check_config(out: str, config: SynthConfig, generator_name: str) -> None:
  path = os.path.join(out, "synth_config.json")
  wanted = {**config.to_json(), "generator": generator_name}
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      found = json.load(f)
    if found != wanted:
      changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
      raise ValueError(f"{out} was made with other settings ({', '.join(changed)}); "
                       "resume with the same ones or write to a new folder")
  else:
    _write_json(path, wanted)


class Report:
  """Counts of one engine run (including prompts finished by an earlier run)."""

  def __init__(self):
    self.counts = collections.Counter()
    self.instructions_rejected = collections.Counter()
    self.rejected_by = collections.Counter()
    self.judged = {"kept": collections.Counter(), "rejected": collections.Counter()}

  def add_samples(self, lines: Sequence[dict]) -> None:
    self.counts["generated"] += len(lines)
    for line in lines:
      kind = "kept" if line["kept"] else "rejected"
      self.counts[kind] += 1
      for reason in line["rejected_by"]:
        self.rejected_by[reason] += 1
      if line.get("follows_edit") is not None:
        edit = line["edit"]
        self.judged[kind][("judged", edit)] += 1
        self.judged[kind][("followed", edit)] += int(line["follows_edit"])
      if line.get("depicts_input") is not None:
        self.judged[kind][("depicts_judged", "")] += 1
        self.judged[kind][("depicts", "")] += int(line["depicts_input"])

  def _judge_summary(self, kind: str) -> dict:
    """Pairs the colour judge could read and the share that show their edit, overall and
    per edit type, and the share of first images that show their caption."""
    c = self.judged[kind]
    edits = sorted({e for (what, e) in c if what == "judged"})
    judged = sum(c[("judged", e)] for e in edits)
    followed = sum(c[("followed", e)] for e in edits)
    share = lambda k, n: round(k / n, 4) if n else None
    return {"judged": judged, "follows_edit": share(followed, judged),
            "per_edit": {e: {"judged": c[("judged", e)],
                             "follows_edit": share(c[("followed", e)], c[("judged", e)])}
                         for e in edits},
            "depicts_input": share(c[("depicts", "")], c[("depicts_judged", "")])}

  def as_dict(self) -> dict:
    return {**{k: self.counts[k] for k in ("captions", "prompts", "resumed_prompts",
                                           "generated", "kept", "rejected")},
            "instructions_rejected": dict(sorted(self.instructions_rejected.items())),
            "rejected_by": {k: self.rejected_by[k] for k in
                            list(METADATA_KEYS) + ["outranked"]},
            "colour_judge": {k: self._judge_summary(k) for k in ("kept", "rejected")}}


class Engine:
  """``Engine(pipe, clip, generator, config).run(captions, out)``: ``pipe`` a
  ``TextToImagePipeline``, ``clip`` a ``metrics.ClipSimilarity``, ``generator`` from
  ``synth.instructions``."""

  def __init__(self, pipe, clip, generator, config: SynthConfig = SynthConfig()):
    self.config = config
    self.generator = generator
    self.pairs = prompt_to_prompt.PromptToPrompt(
        pipe, num_inference_steps=config.num_inference_steps, scheduler=config.scheduler,
        height=config.height, width=config.width)
    self.filter = ClipFilter(clip, config.filter)

  def generate(self, caption: str, edited: str, index: int):
    """All ``samples`` pairs of prompt ``index``, in fixed-size batches (one compile)."""
    cfg = self.config
    seeds, p, scales = prompt_to_prompt.draw(cfg.seed, index, cfg.samples, cfg.p_range,
                                             cfg.guidance_range)
    first, second = [], []
    for start in range(0, cfg.samples, cfg.batch_size):
      part = slice(start, start + cfg.batch_size)
      n = len(seeds[part])
      pad = lambda a: np.concatenate([a[part], np.repeat(a[part][-1:], cfg.batch_size - n)])
      a, b = self.pairs([caption] * cfg.batch_size, [edited] * cfg.batch_size,
                        pad(seeds), pad(p), pad(scales))
      first.append(a[:n])
      second.append(b[:n])
    return seeds, p, scales, np.concatenate(first), np.concatenate(second)

  def run(self, captions: Sequence[str], out: str,
          progress: Callable[[dict], None] | None = None) -> tuple[dict, list[dict]]:
    """Makes (or completes) the dataset in ``out``. Returns the report and the pairs for
    the contact sheet (up to ``SHEET_ROWS`` kept and rejected ones of this run).
    ``progress(report)`` is called after each caption."""
    os.makedirs(out, exist_ok=True)
    _remove_partial_writes(out)
    _check_config(out, self.config, self.generator.name)
    report, listing, sheet = Report(), {}, {"kept": [], "rejected": []}
    report.counts["captions"] = len(captions)
    for index, caption in enumerate(captions):
      folder = os.path.join(out, folder_name(index))
      if os.path.isfile(os.path.join(folder, "prompt.json")):
        lines = _read_metadata(folder)
        report.counts["prompts"] += 1
        report.counts["resumed_prompts"] += 1
        report.add_samples(lines)
        listing[folder_name(index)] = [line["seed"] for line in lines if line["kept"]]
      else:
        self._prompt(index, caption, folder, report, listing, sheet)
      if progress is not None:
        progress(report.as_dict())
    _write_json(os.path.join(out, "seeds.json"), _seeds(listing))
    result = report.as_dict()
    _write_json(os.path.join(out, "synth_report.json"), result)
    return result, sheet["kept"] + sheet["rejected"]

  def _prompt(self, index, caption, folder, report, listing, sheet) -> None:
    proposal = self.generator(caption, index)
    if proposal.rejected is not None:
      report.instructions_rejected[proposal.rejected] += 1
      return
    edited = proposal.edited_caption
    seeds, p, scales, first, second = self.generate(caption, edited, index)
    sims, decision = self.filter(first, second, caption, edited)
    scenes = parse_shapes_caption(caption), parse_shapes_caption(edited)
    lines = []
    for i, seed in enumerate(seeds):
      line = dict(seed=int(seed), p=float(p[i]), cfg_scale=float(scales[i]),
                  **{key: float(sims[name][i]) for name, key in METADATA_KEYS.items()},
                  kept=bool(decision.kept[i]), rejected_by=decision.reasons(i))
      if None not in scenes:
        verdict = scene_match.follows(first[i], second[i], *scenes)
        line.update(edit=verdict["edit"], follows_edit=verdict["ok"],
                    depicts_input=scene_match.depicts(first[i], scenes[0])["ok"])
      lines.append(line)
      kind = "kept" if line["kept"] else "rejected"
      if len(sheet[kind]) < SHEET_ROWS:
        label = "kept" if line["kept"] else "rejected: " + ", ".join(line["rejected_by"])
        if line.get("follows_edit") is not None:
          label += " | shows the edit" if line["follows_edit"] else " | edit not shown"
        sheet[kind].append(dict(input_image=first[i], edited_image=second[i],
                                instruction=f"[{label}] {proposal.instruction}"))
      if line["kept"]:
        for k, image in enumerate((first[i], second[i])):
          with atomic_write(os.path.join(folder, f"{seed}_{k}.jpg")) as f:
            f.write(_jpeg(image, self.config.jpeg_quality))
    with atomic_write(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(line) + "\n" for line in lines))
    _write_json(os.path.join(folder, "prompt.json"), dict(
        caption=caption, input=caption, edit=proposal.instruction, output=edited, index=index))
    report.counts["prompts"] += 1
    report.add_samples(lines)
    listing[folder_name(index)] = [line["seed"] for line in lines if line["kept"]]
    _write_json(os.path.join(os.path.dirname(folder), "seeds.json"), _seeds(listing))


def _read_metadata(folder: str) -> list[dict]:
  with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _seeds(listing: dict[str, list[int]]) -> list:
  return [[name, sorted(seeds)] for name, seeds in sorted(listing.items()) if seeds]


def contact_sheet(rows: list[dict]):
  """A PNG-ready sheet of (first | second) pairs labelled kept / rejected and why."""
  from ip2p_jax.data.contact_sheet import contact_sheet as sheet
  return sheet(rows, num=len(rows))
