"""Edit chains: a source image and the edits applied to it in order, each step's output
the next step's input (the refinement loop the paper lists as missing).

    chain = EditChain(images.load("photo.png"), name="photo.png", resolution=512)
    chain.apply(pipe, Step("make it winter", seed=1))
    chain.apply(pipe, Step("add a red scarf", seed=4, text_scale=9))
    chain.undo()                                  # back to after the first step
    other = chain.branch(0)                       # a new chain from the source
    chain.save("chain.json")
    EditChain.load("chain.json").replay(pipe, images.load("other.png"), "other.png")

A step's output depends only on its record (instruction, seed, scales, steps, sampler,
karras),
its input image, the model and the chain's preparation (``resolution``, ``resize``; the
compute dtype is the pipeline's, and the chain's ``dtype`` records the one ``ip2p edit
--chain`` loads the model with): the noise is ``fold_in(key(seed), noise_id(name))``, as ``ip2p edit`` gives
an input file named ``name``, so step 1 of a chain is exactly ``ip2p edit name -p ...``
and ``ip2p edit --chain chain.json name`` replays the whole chain. The JSON keeps each
step's record and a hash of its output's pixels, so a replay can say whether it
reproduced the recorded images; :meth:`EditChain.run_on_files` runs the steps over
files and folders through ``ip2p_jax.editing`` (records, manifest, resume).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Sequence

from PIL import Image

from ip2p_jax import editing
from ip2p_jax import images as imagelib
from ip2p_jax.editing import EditError, Step

FORMAT = "ip2p_jax.chain/1"


def pixels_sha256(image: Image.Image) -> str:
  """A hash of an image's RGB pixels and size (not of a file's bytes: a PNG and its
  re-encoding hash the same)."""
  rgb = imagelib.to_rgb(image)
  h = hashlib.sha256(f"{rgb.width}x{rgb.height}\0".encode())
  h.update(rgb.tobytes())
  return "sha256:" + h.hexdigest()


@dataclasses.dataclass
class EditChain:
  """A source image and the steps applied to it; ``images[k]`` is step ``k``'s output
  (absent for a chain loaded from JSON until :meth:`replay`).

  ``name``: the source's file name, which fixes every step's noise (``ip2p edit``'s
  noise id of an input file of that name). ``model``: the id of the model that made
  it (``ip2p edit``'s model hash); recorded for people and for ``ip2p edit --chain``,
  which warns when it replays with another model (``replay`` itself does not compare)."""
  source: Image.Image | None
  name: str = "image.png"
  resolution: int = 512
  resize: str = "fit"
  dtype: str = "float32"
  model: str | None = None
  steps: list[Step] = dataclasses.field(default_factory=list)
  images: list[Image.Image] = dataclasses.field(default_factory=list)
  source_sha256: str | None = None  # of the source's pixels
  output_sha256: list[str | None] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    if self.source is not None:
      self.source = imagelib.to_rgb(self.source)
      self.source_sha256 = pixels_sha256(self.source)
    if self.resize not in imagelib.RESIZE_MODES:
      raise EditError(f"resize must be one of {list(imagelib.RESIZE_MODES)}, got {self.resize!r}")
    if not isinstance(self.resolution, int) or self.resolution < 8:
      raise EditError(f"resolution must be an integer >= 8, got {self.resolution!r}")
    self.output_sha256 = (list(self.output_sha256) or [None] * len(self.steps))

  @property
  def noise_id(self) -> int:
    return editing.noise_id(self.name)

  @property
  def tip(self) -> Image.Image:
    """The image the next step edits: the last step's output, or the source."""
    if len(self.images) < len(self.steps):
      raise EditError("this chain's images have not been made yet: replay it on its source")
    if self.images:
      return self.images[-1]
    if self.source is None:
      raise EditError("this chain has no source image: replay it on one")
    return self.source

  def edit(self, pipe, step: Step) -> tuple[Step, Image.Image]:
    """``step`` applied to :attr:`tip`, not yet appended: the step with its sampler
    resolved (the model's own when it names none) and the edited image."""
    if step.sampler is None:
      step = dataclasses.replace(step, sampler=pipe.sampler_and_levels(None, step.steps)[0])
    editing.validate_step(step)
    (out,) = editing.edit_images(pipe, [self.tip], [step], [self.noise_id],
                                 resolution=self.resolution, resize=self.resize)
    return step, out

  def append(self, step: Step, image: Image.Image) -> None:
    """Adds a step and its output (from :meth:`edit`)."""
    self.tip  # noqa: B018 - raises when the chain's images are missing
    self.steps.append(step)
    self.images.append(image)
    self.output_sha256.append(pixels_sha256(image))

  def apply(self, pipe, step: Step) -> Image.Image:
    """Edits :attr:`tip` by ``step`` and appends it; returns the new image."""
    step, image = self.edit(pipe, step)
    self.append(step, image)
    return image

  def undo(self) -> tuple[Step, Image.Image | None]:
    """Removes the last step; returns it and its output."""
    if not self.steps:
      raise EditError("nothing to undo: the chain has no steps")
    self.output_sha256.pop()
    image = self.images.pop() if len(self.images) == len(self.steps) else None
    return self.steps.pop(), image

  def branch(self, k: int) -> "EditChain":
    """A new chain holding the source and the first ``k`` steps (0: the source alone);
    this chain is unchanged."""
    if not 0 <= k <= len(self.steps):
      raise EditError(f"can branch after step 0 to {len(self.steps)}, not {k}")
    return dataclasses.replace(self, steps=self.steps[:k], images=self.images[:k],
                               output_sha256=self.output_sha256[:k])

  def replay(self, pipe, image: Image.Image | None = None, name: str | None = None
             ) -> "EditChain":
    """A new chain: these steps applied in order to ``image`` (default: this chain's
    source), whose file name ``name`` fixes the noise (default: this chain's)."""
    image = self.source if image is None else image
    if image is None:
      raise EditError("this chain has no source image: give one to replay it on")
    fresh = EditChain(image, name or self.name, self.resolution, self.resize, self.dtype,
                      self.model)
    for step in self.steps:
      fresh.apply(pipe, step)
    return fresh

  def reproduces(self, other: "EditChain") -> bool:
    """Whether ``other`` (a replay) has this chain's source and every recorded output."""
    return (self.source_sha256 == other.source_sha256 and self.steps == other.steps
            and all(a is None or a == b for a, b in zip(self.output_sha256, other.output_sha256)))

  def run_on_files(self, pipe, inputs: Sequence[str], out_dir: str, *, batch_size: int = 1,
                   overwrite: bool = False, model: str | None = None, progress=None):
    """The steps over image files, folders and globs into ``out_dir``, as ``ip2p edit
    --chain`` runs them (each image's noise from its path relative to its folder;
    records, manifest and resume as ``ip2p_jax.editing``; the CLI also warns when its
    model is not the chain's, which this does not check). Returns the
    :class:`editing.Report`."""
    settings = self.settings(batch_size=batch_size, overwrite=overwrite)
    return editing.edit_files(pipe, inputs, out_dir, settings, model=model or self.model,
                              progress=progress)

  def settings(self, **job) -> editing.EditSettings:
    """The :class:`editing.EditSettings` that run these steps (``job``: batch_size, ...)."""
    if not self.steps:
      raise EditError("the chain has no steps to run")
    return editing.EditSettings(prompt=None, chain=tuple(self.steps), resolution=self.resolution,
                                resize=self.resize, dtype=self.dtype, **job)

  # -- JSON ------------------------------------------------------------------------

  def to_dict(self) -> dict:
    return {
        "format": FORMAT,
        "source": {"name": self.name, "sha256": self.source_sha256,
                   "size": list(self.source.size) if self.source is not None else None},
        "model": self.model, "resolution": self.resolution, "resize": self.resize,
        "dtype": self.dtype,
        "steps": [{**step.to_dict(), "output_sha256": digest}
                  for step, digest in zip(self.steps, self.output_sha256)],
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

  def save(self, path: str) -> None:
    """Writes the chain's JSON atomically."""
    from ip2p_jax.atomic import atomic_write
    with atomic_write(path, "w", encoding="utf-8") as f:
      f.write(self.to_json())

  @classmethod
  def from_dict(cls, data, where: str = "chain", source: Image.Image | None = None
                ) -> "EditChain":
    """A chain from :meth:`to_dict`'s JSON (steps and recorded hashes, no images);
    ``source``: its source image, if at hand. Bad content is an :class:`EditError`
    naming ``where`` and the field."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
      got = data.get("format") if isinstance(data, dict) else type(data).__name__
      raise EditError(f"{where}: not an edit chain (format {got!r}, expected {FORMAT!r})")
    steps_data = data.get("steps")
    if not isinstance(steps_data, list):
      raise EditError(f"{where}: 'steps' must be a list")
    steps, digests = [], []
    for k, entry in enumerate(steps_data):
      entry = dict(entry) if isinstance(entry, dict) else entry
      digest = entry.pop("output_sha256", None) if isinstance(entry, dict) else None
      steps.append(Step.from_dict(entry, f"{where}: step {k + 1}"))
      digests.append(digest)
    src = data.get("source") or {}
    if not isinstance(src, dict):
      raise EditError(f"{where}: 'source' must be an object")
    name = src.get("name") or "image.png"
    fields = dict(resolution=data.get("resolution", 512), resize=data.get("resize", "fit"),
                  dtype=data.get("dtype", "float32"))
    if fields["dtype"] not in ("float32", "bfloat16"):
      raise EditError(f"{where}: dtype must be float32 or bfloat16, got {fields['dtype']!r}")
    try:
      chain = cls(source, name, model=data.get("model"), steps=steps, output_sha256=digests,
                  **fields)
    except EditError as e:
      raise EditError(f"{where}: {e}") from None
    if source is None:
      chain.source_sha256 = src.get("sha256")
    return chain

  @classmethod
  def load(cls, path: str, source: Image.Image | None = None) -> "EditChain":
    """A chain saved by :meth:`save` (or downloaded from ``ip2p demo``)."""
    try:
      with open(path, encoding="utf-8") as f:
        data = json.load(f)
    except FileNotFoundError:
      raise EditError(f"{path}: no such chain file") from None
    except (OSError, ValueError) as e:
      raise EditError(f"{path}: not readable as JSON ({e})") from None
    return cls.from_dict(data, path, source)
