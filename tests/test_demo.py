"""``ip2p demo``'s actions without a browser, on the tiny model: requests that arrive
together run as one batch, bad uploads are messages, and run / continue / undo / branch /
grid / downloads keep a chain that replays to the image on show."""
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ip2p_jax import InstructPix2PixPipeline, editing
from ip2p_jax import images as imagelib
from ip2p_jax.chain import EditChain
from ip2p_jax.demo import Batcher, Demo, history
from ip2p_jax.editing import EditError, Step

RES = 16


def _pixels(im) -> np.ndarray:
  return np.asarray(imagelib.to_rgb(im), np.int16)


@pytest.fixture(scope="module")
def pipe(model):
  pipe = InstructPix2PixPipeline.from_pretrained(model)
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.fixture(scope="module")
def demo(pipe):
  # A wide window: the test's three threads always land in one batch.
  demo = Demo(Batcher(pipe, RES, max_batch=4, window=2.0), "tiny", "euler_ancestral")
  yield demo
  demo.batcher.close()
  demo.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  path = tmp_path_factory.mktemp("demo") / "photo.png"
  Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), np.uint8)).save(path)
  return str(path)


def test_requests_arriving_together_run_as_one_batch(demo, pipe, photo):
  image = imagelib.load(photo)
  steps = [Step("make it red", seed=1, steps=3, sampler="euler_ancestral"),
           Step("add snow", seed=1, text_scale=5.0, steps=3, sampler="euler_ancestral"),
           Step("make it blue", seed=1, image_scale=2.0, steps=3, sampler="euler_ancestral")]
  results = [None] * 3
  calls = demo.batcher.calls

  def request(k):
    results[k] = demo.batcher.edit(image, 7 + k, steps[k])

  threads = [threading.Thread(target=request, args=(k,)) for k in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert demo.batcher.calls == calls + 1  # one compiled call for the three
  # Each equals its own edit alone. Batch size changes XLA's accumulation order (~1e-5,
  # tests/test_batch_editing.py), so a pixel may round to the next 8-bit level: <= 1.
  for k, result in enumerate(results):
    (alone,) = editing.edit_images(pipe, [image], [steps[k]], [7 + k], resolution=RES)
    assert np.abs(_pixels(result) - _pixels(alone)).max() <= 1
  assert len({_pixels(r).tobytes() for r in results}) == 3


@pytest.mark.parametrize("content,message", [
    (b"", "x.png: empty file (0 bytes)"),
    (b"hello, not a picture", "x.png: not a readable image"),
    ("huge", "x.png: 5000x4000 = 20,000,000 pixels exceeds the limit of 16,000,000"),
])
def test_bad_uploads_are_a_message(demo, tmp_path, content, message):
  path = tmp_path / "x.png"
  if content == "huge":
    Image.new("L", (5000, 4000)).save(path)
  else:
    path.write_bytes(content)
  with pytest.raises(EditError) as error:
    demo.open(str(path))
  assert message in str(error.value) and str(tmp_path) not in str(error.value)


def test_run_continue_undo_branch_and_downloads(demo, pipe, photo, tmp_path):
  a = Step("make it red", seed=2, steps=3)
  b = Step("add snow", seed=3, steps=3)
  session = demo.open(photo)
  with pytest.raises(EditError, match="no result to continue from"):
    demo.proceed(session)
  demo.run(session, a)
  first = session.pending[1]
  demo.proceed(session)
  assert session.chain.tip is first and session.pending is None
  demo.run(session, b)
  second = session.pending[1]
  # The downloads: the shown image and the chain that made it, which replays to it.
  image_path, chain_path = demo.downloads(session)
  assert _pixels(Image.open(image_path)).tobytes() == _pixels(second).tobytes()
  saved = EditChain.load(chain_path)
  assert [s.instruction for s in saved.steps] == ["make it red", "add snow"]
  assert saved.steps[0].sampler == "euler_ancestral"  # the model's own, recorded by name
  replay = saved.replay(pipe, imagelib.load(photo), "photo.png")
  assert saved.reproduces(replay)
  assert _pixels(replay.tip).tobytes() == _pixels(second).tobytes()
  # Undo takes back the "Continue": the first result is pending again, the source is input.
  demo.undo(session)
  assert session.chain.steps == [] and session.pending[1] is first
  with pytest.raises(EditError, match="nothing to undo"):
    demo.undo(session)
  demo.proceed(session)
  demo.run(session, b)
  demo.proceed(session)
  assert [c for _, c in history(session)][1:] == [
      "1. make it red (seed 2, text 7.5, image 1.5, 3 euler_ancestral)",
      "2. add snow (seed 3, text 7.5, image 1.5, 3 euler_ancestral)"]
  # Branch from the source: a second chain, the first kept and selectable.
  with pytest.raises(EditError, match="pick an image"):
    demo.branch(session)
  demo.select(session, 0)
  demo.branch(session)
  assert session.active == 1 and session.chain.steps == [] and len(session.branches) == 2
  demo.switch(session, 0)
  assert len(session.chain.steps) == 2


def test_scale_grid_on_demand(demo, photo):
  session = demo.open(photo)
  grid = demo.grid(session, Step("make it red", steps=2))
  # 4 text scales x 4 image scales of 16 px cells, plus the label margins (64, 18).
  assert grid.size == (64 + 4 * 16, 18 + 4 * 16)
  pixels = np.asarray(grid)
  cells = [pixels[18 + r * 16:34 + r * 16, 64 + c * 16:80 + c * 16].tobytes()
           for r in range(4) for c in range(4)]
  source = np.asarray(session.chain.tip).tobytes()
  assert source not in cells  # every cell is an edit, not the input
  assert len(set(cells)) >= 12  # and the scales change it
  with pytest.raises(EditError, match="write an instruction"):
    demo.grid(session, Step(" "))


def test_close_while_a_batch_is_gathering_returns():
  """close() sent while the worker is still gathering a batch (inside its window) ends the
  worker after that batch: the edit gets its result and close() returns."""
  batcher = Batcher(pipe=None, resolution=RES, max_batch=4, window=1.0)
  batcher._edit = lambda requests: [f"edited {r[1]}" for r in requests]  # no model needed
  result = {}
  worker = threading.Thread(target=lambda: result.update(out=batcher.edit(None, 7, None)))
  worker.start()
  time.sleep(0.2)  # the edit is taken; the worker waits for more within its window
  closer = threading.Thread(target=batcher.close)
  closer.start()
  closer.join(timeout=10)
  worker.join(timeout=10)
  assert not closer.is_alive(), "close() hung"
  assert result == {"out": "edited 7"}
