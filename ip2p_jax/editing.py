"""Editing a set of image files: the job behind ``ip2p edit``.

Inputs are files, folders (searched recursively) and globs. Each input file has a
root: the folder given, the folder part of a glob before its first wildcard, or a
file's own folder. Its path relative to that root (``REL``, ``/``-separated) is its
identity: the output is ``OUT/REL`` with a ``.png`` suffix (subfolders mirrored)
and the noise is ``fold_in(key(seed), noise_id(REL))``. Adding, removing or
reordering inputs never changes another image's name or edit; two inputs that
would write the same output are an error before any work.

Several edits may run in sequence (a chain: ``ip2p edit -p A -p B``, ``--chain FILE``):
each step's output, 8-bit and with the padding cropped off, is the next step's input,
and every step's noise is ``fold_in(key(its seed), noise_id(REL))``. A chain runs one
step at a time over a window of images (each instruction encoded once per run), so a
folder through two steps costs about what one run per instruction does, without
writing and reading the intermediate images.

Every output PNG carries its own record (input, instruction, seed, scales, steps,
sampler, resolution, resize, dtype, model hash; a chain's steps under ``chain``) in a
text chunk, and
``OUT/manifest.json`` keeps every run (time, settings, what was edited, kept and
failed, appended) and every output's record. An existing output made with exactly
the current settings is kept, so a killed run resumes where it stopped; a folder
holding outputs made otherwise is refused (:class:`EditError`) unless
``overwrite``. Unreadable inputs are skipped, reported and listed. On several
hosts process ``r`` of ``n`` edits the inputs ``k`` (in sorted order) with
``k % n == r`` and writes ``manifest.process-r.json``.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import time
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ip2p_jax import images as imagelib
from ip2p_jax.atomic import TMP_PREFIX, atomic_write

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
MAX_SEED = 2 ** 32 - 1
RECORD_KEY = "ip2p_jax"  # the PNG text chunk holding an output's record
MANIFEST = "manifest.json"
# The record keys an output's pixels depend on, besides its input file.
RECIPE_KEYS = ("instruction", "seed", "text_scale", "image_scale", "steps", "sampler", "karras",
               "chain", "resolution", "resize", "dtype", "model")
STEP_KEYS = ("instruction", "seed", "text_scale", "image_scale", "steps", "sampler", "karras")


class EditError(ValueError):
  """An edit job that cannot run as asked: bad settings, inputs that would share an
  output, or an output folder holding outputs made otherwise."""


@dataclasses.dataclass(frozen=True)
class Step:
  """One edit: what its output depends on besides its input image, the model and the
  preparation (resolution, resize, dtype). ``sampler`` None: the model's own."""
  instruction: str
  seed: int = 0
  text_scale: float = 7.5
  image_scale: float = 1.5
  steps: int = 50  # pipelines.DEFAULT_STEPS
  sampler: str | None = None
  karras: bool = False  # Karras sigmas (diffusers' use_karras_sigmas)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, data, where: str = "step") -> "Step":
    """A step from its :meth:`to_dict` record; wrong or missing fields are an
    :class:`EditError` naming ``where``."""
    if not isinstance(data, dict):
      raise EditError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(STEP_KEYS))
    if unknown:
      raise EditError(f"{where}: unknown field(s) {unknown}; a step has {list(STEP_KEYS)}")
    if not isinstance(data.get("instruction"), str):
      raise EditError(f"{where}: 'instruction' must be a string")
    types = dict(seed=(int,), text_scale=(int, float), image_scale=(int, float), steps=(int,),
                 sampler=(str, type(None)), karras=(bool,))
    for key, allowed in types.items():
      value = data.get(key, getattr(cls, key))
      if not isinstance(value, allowed) or (isinstance(value, bool) and key != "karras"):
        raise EditError(f"{where}: {key!r} = {value!r} has the wrong type")
    step = cls(**{k: data[k] for k in STEP_KEYS if k in data})
    validate_step(step, where)
    return step

  @property
  def batch_key(self) -> tuple:
    """Steps with the same key run as one compiled call (instructions and scales are
    per-image inputs; the guided and unguided programs differ)."""
    guided = self.text_scale > 1.0 and self.image_scale >= 1.0
    return (self.seed, self.steps, self.sampler, self.karras, guided)


@dataclasses.dataclass
class EditSettings:
  """One run of ``ip2p edit``: the edit (``prompt`` ... ``karras``) or, when ``chain`` is
  given, its steps in order; and how the job runs."""
  prompt: str | None
  steps: int = 50  # pipelines.DEFAULT_STEPS
  text_scale: float = 7.5
  image_scale: float = 1.5
  seed: int = 0
  sampler: str | None = None
  karras: bool = False  # Karras sigmas (diffusers' use_karras_sigmas)
  resolution: int = 512
  resize: str = "fit"
  batch_size: int = 1
  overwrite: bool = False
  max_pixels: int = imagelib.DEFAULT_MAX_PIXELS
  dtype: str = "float32"
  chain: tuple[Step, ...] = ()  # several edits in sequence; replaces prompt ... karras

  def edits(self) -> list[Step]:
    """The steps this run applies, in order (one unless ``chain``)."""
    if self.chain:
      return list(self.chain)
    return [Step(self.prompt, self.seed, self.text_scale, self.image_scale, self.steps,
                 self.sampler, self.karras)]


@dataclasses.dataclass(frozen=True)
class Item:
  """One input file: where it is, its path relative to its root, its output and noise id."""
  input: str
  rel: str
  output: str
  noise_id: int


@dataclasses.dataclass
class Plan:
  """What a run will do, decided before the model loads (see :func:`make_plan`)."""
  out_dir: str
  items: list[Item]
  todo: list[Item]
  kept: list[Item]
  missing: list[dict]
  recipe: dict
  previous: dict[str, dict]  # output REL -> record, from the folder's manifests and PNGs
  steps: list[Step] = dataclasses.field(default_factory=list)  # samplers resolved


@dataclasses.dataclass
class Report:
  edited: list[dict] = dataclasses.field(default_factory=list)
  skipped_existing: list[dict] = dataclasses.field(default_factory=list)
  failed: list[dict] = dataclasses.field(default_factory=list)
  seconds: float = 0.0

  @property
  def ok(self) -> bool:
    return not self.failed


def validate_step(step: Step, where: str = "") -> None:
  """:class:`EditError` naming the first bad field of ``step`` (with its command-line flag;
  ``where`` prefixes the message, e.g. a chain file's step)."""
  s, at = step, f"{where}: " if where else ""
  checks = [
      (isinstance(s.instruction, str), f"{at}the instruction must be a string"),
      (isinstance(s.seed, int) and 0 <= s.seed <= MAX_SEED,
       f"{at}--seed must be an integer in [0, {MAX_SEED}], got {s.seed!r}"),
      (math.isfinite(s.text_scale),
       f"{at}--text-scale must be a finite number, got {s.text_scale}"),
      (math.isfinite(s.image_scale),
       f"{at}--image-scale must be a finite number, got {s.image_scale}"),
      (s.steps >= 1, f"{at}--steps must be >= 1, got {s.steps}"),
  ]
  for ok, message in checks:
    if not ok:
      raise EditError(message)


def validate_settings(settings: EditSettings) -> None:
  """Every setting checked at once, before any work; :class:`EditError` names the first
  bad one with its command-line flag."""
  s = settings
  steps = s.edits()
  for k, step in enumerate(steps):
    validate_step(step, f"step {k + 1}" if len(steps) > 1 else "")
  checks = [
      (s.batch_size >= 1, f"--batch-size must be >= 1, got {s.batch_size}"),
      (s.resolution >= 8, f"--resolution must be >= 8, got {s.resolution}"),
      (s.resize in imagelib.RESIZE_MODES,
       f"--resize must be one of {list(imagelib.RESIZE_MODES)}, got {s.resize!r}"),
      (s.max_pixels >= 1, f"--max-pixels must be >= 1, got {s.max_pixels}"),
  ]
  for ok, message in checks:
    if not ok:
      raise EditError(message)


def noise_id(rel: str) -> int:
  """An input's noise index: 31 bits of sha256 of its relative path."""
  return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:4], "little") & 0x7FFFFFFF


def _glob_root(pattern: str) -> str:
  """The folder part of ``pattern`` before its first wildcard."""
  head = pattern
  while any(c in head for c in "*?["):
    head = os.path.dirname(head)
  return head or "."


def _inside(path: str, folder: str | None) -> bool:
  if folder is None:
    return False
  folder = os.path.realpath(folder)
  return os.path.realpath(path).startswith(folder + os.sep)


def _images_under(folder: str) -> list[str]:
  return [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names
          if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith(TMP_PREFIX)]


def expand_inputs(inputs: Sequence[str], exclude: str | None = None
                  ) -> tuple[list[tuple[str, str]], list[dict]]:
  """Files, folders (their image files, recursively) and globs -> sorted ``(file, REL)``
  pairs, one per file (the first input naming a file gives its REL); files inside
  ``exclude`` (the output folder) are left out of folders and globs. Inputs that match
  nothing are returned as failures."""
  found: dict[str, str] = {}
  missing = []
  for item in inputs:
    if os.path.isdir(item):
      pairs = [(f, os.path.relpath(f, item)) for f in _images_under(item) if not _inside(f, exclude)]
    elif os.path.isfile(item):
      pairs = [(item, os.path.basename(item))]
    else:
      root = _glob_root(item)
      pairs = [(f, os.path.relpath(f, root)) for f in glob.glob(item, recursive=True)
               if os.path.isfile(f) and not _inside(f, exclude)]
      if not pairs:
        missing.append({"input": item, "error": f"{item}: no such file, folder or matching glob"})
    for f, rel in pairs:
      found.setdefault(os.path.normpath(f), rel.replace(os.sep, "/"))
  return sorted(found.items()), missing


def output_rel(rel: str) -> str:
  """The output's path relative to the output folder: REL with a ``.png`` suffix."""
  return os.path.splitext(rel)[0] + ".png"


def plan_items(pairs: Sequence[tuple[str, str]], out_dir: str) -> list[Item]:
  """One :class:`Item` per ``(file, REL)``; inputs that would share an output, or
  overwrite themselves, are an :class:`EditError`."""
  items, by_output = [], {}
  for f, rel in pairs:
    out = output_rel(rel)
    if out in by_output:
      raise EditError(
          f"{by_output[out]} and {f} would both be written to {os.path.join(out_dir, out)}: "
          "give their common folder as the input (subfolders are mirrored) or rename one")
    by_output[out] = f
    item = Item(f, rel, os.path.join(out_dir, out), noise_id(rel))
    if os.path.realpath(item.output) == os.path.realpath(f):
      raise EditError(f"{f}: its output would overwrite it; choose another -o")
    items.append(item)
  return items


def resolved_steps(settings: EditSettings, sampler: str) -> list[Step]:
  """The run's steps with ``sampler`` (the model's own) filled in where a step names none."""
  return [dataclasses.replace(step, sampler=step.sampler or sampler)
          for step in settings.edits()]


def recipe(settings: EditSettings, sampler: str, model: str) -> dict:
  """What an output's pixels depend on besides its input (see ``RECIPE_KEYS``): one
  edit's fields, or a chain's steps under ``chain``."""
  s = settings
  job = dict(resolution=s.resolution, resize=s.resize, dtype=s.dtype, model=model)
  steps = resolved_steps(settings, sampler)
  if len(steps) > 1:
    return dict(chain=[step.to_dict() for step in steps], **job)
  (step,) = steps
  return dict(instruction=step.instruction, seed=step.seed, text_scale=step.text_scale,
              image_scale=step.image_scale, steps=step.steps, sampler=step.sampler,
              karras=True if step.karras else None,  # None: records from before --karras match
              **job)


def record(item: Item, recipe_: dict) -> dict:
  """An output's own record: its input (absolute path), its noise id and its recipe."""
  return {"input": os.path.abspath(item.input), "noise_id": item.noise_id, **recipe_}


def _manifest_paths(out_dir: str) -> list[str]:
  return sorted({os.path.join(out_dir, MANIFEST),
                 *glob.glob(os.path.join(out_dir, "manifest.process-*.json"))})


def read_manifest(path: str) -> dict:
  """``{"runs": [...], "outputs": {REL: record}}`` from ``path`` (empty if absent; a
  manifest of the earlier one-run format becomes its first run, with no records)."""
  if not os.path.isfile(path):
    return {"runs": [], "outputs": {}}
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise EditError(f"{path}: unreadable ({e}); move it away or choose another -o") from None
  if not isinstance(data, dict):
    raise EditError(f"{path}: not a manifest (a JSON {type(data).__name__}); move it away "
                    "or choose another -o")
  if "runs" not in data:
    return {"runs": [data], "outputs": {}}
  return {"runs": list(data.get("runs", [])), "outputs": dict(data.get("outputs", {}))}


def _embedded_record(path: str) -> dict | None:
  text = imagelib.read_text(path).get(RECORD_KEY)
  try:
    return json.loads(text) if text else None
  except ValueError:
    return None


def previous_records(out_dir: str) -> dict[str, dict]:
  """Output REL -> record for every output of earlier runs whose file still exists, from
  the manifests (:func:`make_plan` then reads a planned file's own embedded record where
  the manifests have none)."""
  records = {}
  for path in _manifest_paths(out_dir):
    for rel, rec in read_manifest(path)["outputs"].items():
      if os.path.isfile(os.path.join(out_dir, rel)):
        records[rel] = rec
  return records


def _difference(old: dict | None, new: dict) -> str:
  if old is None:
    return "no record of how it was made"
  keys = [k for k in ("input", "noise_id", *RECIPE_KEYS) if old.get(k) != new.get(k)]
  if "chain" in keys:  # one field, not each step's
    keys = [k for k in keys if k not in STEP_KEYS]
  return ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def make_plan(inputs: Sequence[str], out_dir: str, settings: EditSettings, *, sampler: str,
              model: str, process: tuple[int, int] | None = None) -> Plan:
  """Checks the settings and inputs, names the outputs, and decides what to edit and
  what to keep. Raises :class:`EditError` when the folder holds outputs made otherwise
  and ``settings.overwrite`` is off. ``process``: (index, count) of this process
  (default: JAX's)."""
  validate_settings(settings)
  pairs, missing = expand_inputs(inputs, exclude=out_dir)
  items = plan_items(pairs, out_dir)
  recipe_ = recipe(settings, sampler, model)
  previous = previous_records(out_dir)
  planned = {output_rel(it.rel) for it in items}
  conflicts, matching = [], set()
  for it in items:
    if not os.path.exists(it.output):
      continue
    rel = output_rel(it.rel)
    old = _embedded_record(it.output) or previous.get(rel)
    if old is not None:
      previous[rel] = old
    new = record(it, recipe_)
    if old is not None and all(old.get(k) == new[k] for k in new):
      matching.add(it.output)
    else:
      conflicts.append((it.output, _difference(old, new)))
  for rel, old in previous.items():
    if rel not in planned and any(old.get(k) != recipe_.get(k) for k in RECIPE_KEYS):
      conflicts.append((os.path.join(out_dir, rel), _difference(old, {**old, **recipe_})))
  if conflicts and not settings.overwrite:
    path, why = conflicts[0]
    raise EditError(
        f"{out_dir} holds {len(conflicts)} output(s) made otherwise (e.g. {path}: {why}); "
        "pass --overwrite to replace them, or choose another -o")
  rank, world = process or _process()
  mine = [it for k, it in enumerate(items) if k % world == rank]
  kept = [it for it in mine if it.output in matching and not settings.overwrite]
  todo = [it for it in mine if it not in kept]
  return Plan(out_dir, items, todo, kept, missing, recipe_, previous,
              resolved_steps(settings, sampler))


def _process() -> tuple[int, int]:
  """(index, count) of this JAX process; JAX is imported here, not with the module, so
  the CLI checks its inputs before paying for that import."""
  import jax
  return jax.process_index(), jax.process_count()


def _remove_stale_temporaries(out_dir: str) -> None:
  for root, _, names in os.walk(out_dir):
    for name in names:
      if name.startswith(TMP_PREFIX):
        try:
          os.unlink(os.path.join(root, name))
        except OSError:
          pass


def write_json(path: str, data) -> None:
  with atomic_write(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, allow_nan=False)
    f.write("\n")


def _batches(items: list, size: int) -> Iterable[list]:
  for i in range(0, len(items), size):
    yield items[i:i + size]


def _write_manifest(plan: Plan, settings: EditSettings, report: Report, started: float) -> None:
  """Appends this run to the process's manifest and records every output it made or kept."""
  rank, world = _process()
  path = os.path.join(plan.out_dir, MANIFEST if world == 1 else f"manifest.process-{rank}.json")
  data = read_manifest(path)
  data["runs"].append({
      "time": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "settings": {**dataclasses.asdict(settings), "sampler": plan.recipe.get("sampler"),
                   "model": plan.recipe["model"],
                   "chain": [step.to_dict() for step in plan.steps] if settings.chain else []},
      "edited": [{"input": e["input"], "output": e["output"]} for e in report.edited],
      "skipped_existing": report.skipped_existing,
      "failed": report.failed, "seconds": round(report.seconds, 3)})
  outputs = data["outputs"]
  for it in plan.kept:
    rel = output_rel(it.rel)
    outputs[rel] = plan.previous.get(rel, record(it, plan.recipe))
  for entry in report.edited:
    outputs[entry["rel"]] = entry["record"]
  data["outputs"] = dict(sorted(outputs.items()))
  write_json(path, data)


def edit_files(pipe, inputs: Sequence[str], out_dir: str, settings: EditSettings, *,
               model: str | None = None, plan: Plan | None = None,
               progress: Callable | None = None) -> Report:
  """Edits every image of ``inputs`` into ``out_dir`` (see module docstring). ``model``
  names the model in the records (default: a hash of ``pipe``'s parameters); ``plan``
  is a :func:`make_plan` result made earlier (the CLI checks before loading the model)."""
  start = time.time()
  if plan is None:
    from ip2p_jax.checkpoints.fingerprint import params_hash
    sampler = settings.sampler or pipe.sampler_and_levels(None, settings.steps)[0]
    plan = make_plan(inputs, out_dir, settings, sampler=sampler,
                     model=model or params_hash(pipe.params))
  os.makedirs(out_dir, exist_ok=True)
  _remove_stale_temporaries(out_dir)
  report = Report(failed=list(plan.missing),
                  skipped_existing=[{"input": it.input, "output": it.output} for it in plan.kept])
  try:
    _edit(pipe, plan, settings, report, progress)
  finally:
    report.seconds = time.time() - start
    _write_manifest(plan, settings, report, start)
  return report


def edit_images(pipe, images: Sequence[Image.Image], steps: Sequence[Step],
                noise_ids: Sequence[int], *, resolution: int, resize: str = "fit",
                batch_size: int = 1, texts: dict | None = None,
                on_batch: Callable[[list[int], list[Image.Image]], None] | None = None
                ) -> list[Image.Image]:
  """Image ``k`` edited by ``steps[k]`` with noise ``noise_ids[k]``: the one edit that
  ``ip2p edit``, edit chains and ``ip2p demo`` share.

  Each image is prepared (``resolution``, ``resize``), images of one prepared size and
  one :attr:`Step.batch_key` run ``batch_size`` at a time through one compiled call (a
  step's instruction and scales are per-image inputs), and each result comes back
  8-bit with the padding cropped off. ``texts``: instruction -> encoded text states,
  filled here so an instruction is encoded once however many calls use it.
  ``on_batch(indices, results)`` is called after every compiled call."""
  if not (len(images) == len(steps) == len(noise_ids)):
    raise ValueError(f"got {len(images)} images, {len(steps)} steps, {len(noise_ids)} noise ids")
  texts = {} if texts is None else texts
  for text in {"", *(step.instruction for step in steps)} - set(texts):
    texts[text] = pipe.encode_prompt([text])[0]
  prepared = [imagelib.prepare(im, resolution, resize, pipe.size_multiple) for im in images]
  groups: dict[tuple, list[int]] = {}
  for k, (p, step) in enumerate(zip(prepared, steps)):
    groups.setdefault((p.image.size, step.batch_key), []).append(k)
  out: list[Image.Image | None] = [None] * len(images)
  for indices in groups.values():
    for batch in _batches(indices, batch_size):
      step = steps[batch[0]]
      result = pipe(prompt_embeds=np.stack([texts[steps[k].instruction] for k in batch]),
                    negative_prompt_embeds=texts[""][None],
                    image=[prepared[k].image for k in batch],
                    num_inference_steps=step.steps,
                    guidance_scale=[steps[k].text_scale for k in batch],
                    image_guidance_scale=[steps[k].image_scale for k in batch],
                    seed=step.seed, scheduler=step.sampler,
                    image_ids=[noise_ids[k] for k in batch],
                    use_karras_sigmas=True if step.karras else None, progress_bar=False)
      edited = [imagelib.unpad(im, prepared[k]) for k, im in zip(batch, result.images)]
      for k, im in zip(batch, edited):
        out[k] = im
      if on_batch:
        on_batch(batch, edited)
  return out


def _edit(pipe, plan: Plan, settings: EditSettings, report: Report, progress) -> None:
  """Loads a window of inputs at a time and runs every step over the whole window; the
  last step's results are written as each compiled call finishes."""
  steps = plan.steps
  texts: dict = {}  # each instruction encoded once for the whole run
  bar = progress(total=len(plan.todo) * len(steps)) if progress else None
  for window in _batches(plan.todo, max(settings.batch_size * 8, 8)):
    loaded = []
    for it in window:
      try:
        loaded.append((it, imagelib.load(it.input, settings.max_pixels)))
      except (imagelib.ImageError, OSError) as e:
        report.failed.append({"input": it.input, "error": str(e)})
        if bar:
          bar.update(len(steps))
    if not loaded:
      continue
    images = [im for _, im in loaded]
    ids = [it.noise_id for it, _ in loaded]

    def save(indices, edited):
      for k, im in zip(indices, edited):
        it = loaded[k][0]
        rec = record(it, plan.recipe)
        imagelib.save(im, it.output, text={RECORD_KEY: json.dumps(rec)})
        report.edited.append({"input": it.input, "output": it.output, "rel": output_rel(it.rel),
                              "noise_id": it.noise_id, "record": rec})

    for n, step in enumerate(steps):
      last = n == len(steps) - 1

      def done(indices, edited, last=last):
        if last:
          save(indices, edited)
        if bar:
          bar.update(len(indices))

      images = edit_images(pipe, images, [step] * len(images), ids,
                           resolution=settings.resolution, resize=settings.resize,
                           batch_size=settings.batch_size, texts=texts, on_batch=done)
  if bar:
    bar.close()


def scale_grid(pipe, image: Image.Image, settings: EditSettings, text_scales: Sequence[float],
               image_scales: Sequence[float], noise_id: int = 0) -> Image.Image:
  """One picture sweeping text scale (columns) x image scale (rows), all cells with the
  noise of ``noise_id`` (the image's own, so the cell at the run's scales is its edit),
  like Figure 4 of the paper. Scales are per-image inputs, so the whole grid is one
  batch and one compiled program."""
  if not text_scales or not image_scales:
    raise EditError("the grid needs at least one text scale and one image scale")
  prepared = imagelib.prepare(image, settings.resolution, settings.resize, pipe.size_multiple)
  cells = [(t, s) for s in image_scales for t in text_scales]
  result = pipe(settings.prompt, [prepared.image] * len(cells),
                num_inference_steps=settings.steps,
                guidance_scale=[t for t, _ in cells], image_guidance_scale=[s for _, s in cells],
                seed=settings.seed, scheduler=settings.sampler, image_ids=[noise_id] * len(cells),
                use_karras_sigmas=True if settings.karras else None, progress_bar=False)
  tiles = [imagelib.unpad(im, prepared) for im in result.images]
  w, h = tiles[0].size
  left, top = 64, 18  # room for the row and column labels (PIL's default font)
  grid = Image.new("RGB", (left + w * len(text_scales), top + h * len(image_scales)), "white")
  draw = ImageDraw.Draw(grid)
  for c, t in enumerate(text_scales):
    draw.text((left + c * w + 2, 3), f"text {t:g}", fill="black")
  for r, s in enumerate(image_scales):
    draw.text((2, top + r * h + h // 2 - 5), f"image {s:g}", fill="black")
  for i, tile in enumerate(tiles):
    r, c = divmod(i, len(text_scales))
    grid.paste(tile, (left + c * w, top + r * h))
  return grid

