"""Image loading (EXIF, modes, limits), the resize modes, and atomic saving."""
import os

import numpy as np
import pytest
from PIL import Image

from ip2p_jax import images


def _save(im, path, **kw):
  im.save(path, **kw)
  return str(path)


def test_exif_orientation_is_applied(tmp_path):
  im = Image.new("RGB", (40, 20), "red")
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  path = _save(im, tmp_path / "o.jpg", exif=exif)
  assert images.load(path).size == (20, 40)


def test_modes_are_converted(tmp_path):
  rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))  # fully transparent -> white
  assert images.load(_save(rgba, tmp_path / "a.png")).getpixel((0, 0)) == (255, 255, 255)
  la = Image.new("LA", (4, 4), (100, 255))
  assert images.load(_save(la, tmp_path / "la.png")).getpixel((0, 0)) == (100, 100, 100)
  cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
  assert images.load(_save(cmyk, tmp_path / "c.jpg")).getpixel((0, 0))[0] > 200  # red-ish
  pal = Image.new("P", (4, 4), 3)
  pal.putpalette([0, 0, 0] * 3 + [0, 0, 255] + [0, 0, 0] * 252)
  assert images.load(_save(pal, tmp_path / "p.png")).getpixel((0, 0)) == (0, 0, 255)
  deep = Image.fromarray(np.full((4, 4), 65535, np.uint16))
  loaded = images.load(_save(deep, tmp_path / "d.png"))
  assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
  half = Image.fromarray(np.full((4, 4), 32768, np.uint16))
  assert images.load(_save(half, tmp_path / "h.png")).getpixel((0, 0))[0] == 128


def test_bad_files_are_named(tmp_path):
  (tmp_path / "empty.png").write_bytes(b"")
  (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(100))
  with pytest.raises(images.ImageError, match="empty.png: empty file"):
    images.load(str(tmp_path / "empty.png"))
  with pytest.raises(images.ImageError, match="junk.jpg: not a readable image"):
    images.load(str(tmp_path / "junk.jpg"))


def test_pixel_limit_refuses_bombs(tmp_path):
  path = _save(Image.new("RGB", (300, 200)), tmp_path / "big.png")
  with pytest.raises(images.ImageError, match="60,000 pixels exceeds the limit of 50,000"):
    images.load(path, max_pixels=50_000)


@pytest.mark.parametrize("size", [(37, 23), (512, 512), (1000, 333), (64, 900)])
@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_prepare_snaps_sizes(size, mode):
  im = Image.new("RGB", size, "blue")
  p = images.prepare(im, 256, mode, multiple=64)
  w, h = p.image.size
  assert w % 64 == 0 and h % 64 == 0 and max(w, h) <= 256 + 32
  if mode == "fit":  # nothing cut: the content keeps the aspect ratio (to rounding)
    l, t, r, b = p.content_box
    assert abs((r - l) / (b - t) - size[0] / size[1]) < 0.1 * size[0] / size[1] + 2 / (b - t)
    assert images.unpad(p.image, p).size == (r - l, b - t)


def test_fit_pads_without_cutting():
  arr = np.zeros((100, 300, 3), np.uint8)
  arr[:, :10] = 255  # a white band on the left edge must survive
  p = images.prepare(Image.fromarray(arr), 128, "fit", multiple=64)
  out = np.asarray(images.unpad(p.image, p))
  assert out[:, 0].mean() > 200 and p.image.size == (128, 64)


def test_save_is_atomic(tmp_path, monkeypatch):
  target = tmp_path / "out.png"
  im = Image.new("RGB", (8, 8))

  def boom(self, fp, *a, **k):
    fp.write(b"partial")
    raise OSError("disk full")
  monkeypatch.setattr(Image.Image, "save", boom)
  with pytest.raises(OSError):
    images.save(im, str(target))
  assert os.listdir(tmp_path) == []  # neither the output nor a temporary file


def test_arrays_round_trip():
  rng = np.random.default_rng(0)
  u8 = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  x = images.to_array(u8)
  assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
  back = np.stack([np.asarray(p) for p in images.to_pil((x + 1) / 2)])
  np.testing.assert_array_equal(back, u8)
  with pytest.raises(images.ImageError, match="must share a size"):
    images.to_array([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 16, 3), np.uint8)])
