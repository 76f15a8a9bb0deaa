"""Images in and out: robust loading, the three resize modes, atomic saving.

Loading applies EXIF orientation and converts any PIL mode (RGBA/LA composited
on white, P, CMYK, 16-bit, float) to 8-bit RGB; a pixel-count limit refuses
decompression bombs with a clear message. Resize modes, all snapping the size
to a multiple the model needs (64 for Stable Diffusion: VAE x8, UNet x8):

  * ``fit``: scale the longest side to ``resolution``, pad the rest (nothing cut);
    :func:`unpad` removes the padding from the result;
  * ``crop``: scale and centre-crop to the snapped size (the original edit_cli,
    ``ImageOps.fit``, which cuts borders);
  * ``resize``: scale to the snapped size, aspect ratio slightly changed.
"""
from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from ip2p_jax.atomic import atomic_write

RESIZE_MODES = ("fit", "crop", "resize")
DEFAULT_MAX_PIXELS = 64_000_000


class ImageError(ValueError):
  """An input image cannot be used (unreadable, empty, too large)."""


def load(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """An 8-bit RGB image from any PIL-readable file, upright per EXIF."""
  if os.path.getsize(path) == 0:
    raise ImageError(f"{path}: empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
          raise ImageError(f"{path}: {w}x{h} = {w * h:,} pixels exceeds the limit of "
                           f"{max_pixels:,} (a decompression bomb or a huge scan); "
                           "raise --max-pixels if it is genuine")
        im.load()
        im = ImageOps.exif_transpose(im)
        return to_rgb(im)
  except ImageError:
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageError(f"{path}: not a readable image ({e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
  """8-bit RGB; transparency is composited on white."""
  if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
    im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
  if im.mode == "P" and "transparency" in im.info:
    im = im.convert("RGBA")
  if im.mode in ("RGBA", "LA", "PA"):
    im = im.convert("RGBA")
    background = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, im)
  return im.convert("RGB")


@dataclasses.dataclass(frozen=True)
class Prepared:
  image: Image.Image                # the model input, sides multiples of `multiple`
  content_box: tuple[int, int, int, int]  # (left, top, right, bottom) of the real image


def target_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
  """Longest side to ``resolution``, both sides rounded to ``multiple`` (at least one)."""
  scale = resolution / max(width, height)
  snap = lambda v: max(multiple, int(round(v * scale / multiple)) * multiple)
  return snap(width), snap(height)


def prepare(im: Image.Image, resolution: int, mode: str = "fit", multiple: int = 64) -> Prepared:
  """The model input for ``im`` under resize ``mode`` (see module docstring)."""
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown resize mode {mode!r}; choose one of {list(RESIZE_MODES)}")
  w, h = target_size(*im.size, resolution, multiple)
  if mode == "crop":
    return Prepared(ImageOps.fit(im, (w, h), method=Image.Resampling.LANCZOS), (0, 0, w, h))
  if mode == "resize":
    return Prepared(im.resize((w, h), Image.Resampling.LANCZOS), (0, 0, w, h))
  scale = min(w / im.width, h / im.height)
  cw, ch = max(1, round(im.width * scale)), max(1, round(im.height * scale))
  content = im.resize((cw, ch), Image.Resampling.LANCZOS)
  # Pad by replicating the border so the model sees no artificial frame.
  arr = np.asarray(content)
  left, top = (w - cw) // 2, (h - ch) // 2
  arr = np.pad(arr, ((top, h - ch - top), (left, w - cw - left), (0, 0)), mode="edge")
  return Prepared(Image.fromarray(arr), (left, top, left + cw, top + ch))


def unpad(result: Image.Image, prepared: Prepared) -> Image.Image:
  """The edited image with the ``fit`` padding removed."""
  return result.crop(prepared.content_box)


def to_array(images) -> np.ndarray:
  """PIL images or uint8/float arrays -> float32 NHWC in [-1, 1]."""
  if isinstance(images, (Image.Image, np.ndarray)):
    images = [images]
  out = []
  for im in images:
    if isinstance(im, Image.Image):
      a = np.asarray(to_rgb(im), dtype=np.float32) / 255.0
    else:
      a = np.asarray(im)
      a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
      if a.ndim == 4:
        out.extend(2 * x - 1 for x in a)
        continue
    out.append(2 * a - 1)
  shapes = {a.shape for a in out}
  if len(shapes) != 1:
    raise ImageError(f"images in one call must share a size, got {sorted(shapes)}; "
                     "prepare them with ip2p_jax.images.prepare or call once per size")
  return np.stack(out)


def model_inputs(images, multiple: int, resolution: int | None = None, mode: str = "fit",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
  """The one image preparation of the Python API and ``ip2p edit``: float32 NHWC pixels
  in [-1, 1] whose sides are multiples of ``multiple``, and each image's content box
  (left, top, right, bottom) to crop the result back to.

  ``images``: a path, PIL image or array, or a list of them (all ending the same size).
  ``resolution`` None keeps each image's size and pads it (edge-replicated, centred) to the
  next multiple; otherwise :func:`prepare` with ``mode`` scales the longest side to
  ``resolution`` first ("fit" pads, "crop"/"resize" fill the frame)."""
  if isinstance(images, (str, os.PathLike, Image.Image)) or (
      isinstance(images, np.ndarray) and images.ndim == 3):
    images = [images]
  pixels, boxes = [], []
  for im in images:
    if isinstance(im, (str, os.PathLike)):
      im = load(os.fspath(im), max_pixels)
    if resolution is not None:
      if not isinstance(im, Image.Image):
        a = np.asarray(im)
        im = Image.fromarray(a if a.dtype == np.uint8 else
                             (np.clip(a, 0, 1) * 255).round().astype(np.uint8))
      prepared = prepare(im, resolution, mode, multiple)
      pixels.append(to_array(prepared.image)[0])
      boxes.append(prepared.content_box)
      continue
    a = to_array(im)[0]
    h, w = a.shape[:2]
    th, tw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    top, left = (th - h) // 2, (tw - w) // 2
    pixels.append(np.pad(a, ((top, th - h - top), (left, tw - w - left), (0, 0)), mode="edge"))
    boxes.append((left, top, left + w, top + h))
  shapes = {a.shape for a in pixels}
  if len(shapes) != 1:
    raise ImageError(f"images in one call must end the same size, got {sorted(shapes)}; "
                     "pass resolution= with mode='crop' or 'resize', or call once per size")
  return np.stack(pixels), boxes


def to_pil(images: np.ndarray) -> list[Image.Image]:
  """Float images in [0, 1] (NHWC) -> PIL, rounding like diffusers."""
  return [Image.fromarray((np.asarray(x) * 255).round().astype(np.uint8)) for x in images]


def save(im: Image.Image, path: str, text: dict[str, str] | None = None) -> None:
  """Writes ``im`` atomically: a temporary file in the same folder, then rename, so
  a killed run never leaves a partial output. ``text``: PNG text chunks (key -> value)
  written into the file itself (PNG only)."""
  suffix = os.path.splitext(path)[1].lower() or ".png"
  fmt = Image.registered_extensions().get(suffix, "PNG")
  extra = {}
  if text:
    if fmt != "PNG":
      raise ValueError(f"{path}: text chunks need a PNG file")
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
      info.add_itxt(key, value)
    extra["pnginfo"] = info
  with atomic_write(path) as f:
    im.save(f, format=fmt, **extra)


def read_text(path: str) -> dict[str, str]:
  """The PNG text chunks :func:`save` wrote (empty for other files or unreadable ones).
  :func:`save` puts them before the pixels, so this reads the header only."""
  try:
    with Image.open(path) as im:
      return {k: str(v) for k, v in im.info.items() if isinstance(v, str)}
  except (OSError, ValueError, SyntaxError):
    return {}
