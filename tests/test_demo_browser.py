"""``ip2p demo`` in a real browser: Debian's Chromium, driven by selenium, on the page the
real command serves with the bundled model. Every image the page shows is fetched from
the page and compared with the library's output for the same settings: pixel-equal (both
run one image at a time, on one CPU device, through the same compiled program).

Skipped, with the reason, only where Chromium, its driver, selenium or Gradio cannot be
installed (``.ci/run`` installs them).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
from demo_page import Page, chromium, fetch, running_demo, why_no_browser  # noqa: E402

from helpers.xla_env import without_shared_cache, xla_flags  # noqa: E402
from ip2p_jax import InstructPix2PixPipeline  # noqa: E402
from ip2p_jax import images as imagelib  # noqa: E402
from ip2p_jax.chain import EditChain  # noqa: E402
from ip2p_jax.editing import Step  # noqa: E402

pytestmark = pytest.mark.skipif(why_no_browser() is not None, reason=str(why_no_browser()))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "shapes_128.png")
STEPS = 4  # sampling steps in the page and the reference (the program is the same for any)


def _step(instruction, seed=0):
  return Step(instruction, seed=seed, steps=STEPS, sampler="euler_ancestral")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The demo, the CLI replay and nothing else share one compilation cache folder."""
  return {**without_shared_cache(os.environ), "XLA_FLAGS": xla_flags(devices=1),
          "IP2P_COMPILATION_CACHE": str(tmp_path_factory.mktemp("xla")),
          "GRADIO_ANALYTICS_ENABLED": "False"}


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
  log = str(tmp_path_factory.mktemp("demo") / "demo.log")
  with running_demo(log, env) as url:
    yield url, log


@pytest.fixture(scope="module")
def browser():
  with chromium() as driver:
    yield driver


@pytest.fixture(scope="module")
def reference():
  """The library on the same bundled model: a chain on the same example."""
  pipe = InstructPix2PixPipeline.from_pretrained(compilation_cache=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe, EditChain(imagelib.load(EXAMPLE), "shapes_128.png", resolution=128)


def _start(server, browser) -> Page:
  page = Page(browser, server[0])
  page.upload(EXAMPLE)
  page.wait_status("Loaded shapes_128.png (128x128)")
  page.set_number("steps", STEPS)
  return page


def _edit(page: Page, instruction: str) -> np.ndarray:
  before = page.image_url("result-image")
  page.type_instruction(instruction)
  page.click("run")
  page.wait_status(f'Edited: "{instruction}"')
  page.wait(lambda: page.image_url("result-image") not in (None, before), "the result image")
  return page.shown("result-image")


def _pixels(image) -> np.ndarray:
  return np.asarray(imagelib.to_rgb(image))


def test_edit_continue_undo_show_the_library_images(server, browser, reference):
  pipe, chain = reference
  page = _start(server, browser)
  source = _pixels(chain.source)
  np.testing.assert_array_equal(page.shown("input-image"), source)

  first = _edit(page, "make the circle blue")
  np.testing.assert_array_equal(first, _pixels(chain.apply(pipe, _step("make the circle blue"))))
  assert np.abs(first.astype(int) - source).mean() > 5  # an edit, not the input again

  page.click("continue")
  page.wait_status("Continuing from step 1")
  page.wait(lambda: page.image_url("result-image") is None, "the result to clear")
  np.testing.assert_array_equal(page.shown("input-image"), first)

  second = _edit(page, "make it night")
  np.testing.assert_array_equal(second, _pixels(chain.apply(pipe, _step("make it night"))))

  page.click("undo")  # takes back the Continue: input = source, result = the first edit
  page.wait_status("Undone: back to step 0")
  page.wait(lambda: np.array_equal(page.shown("input-image"), source), "the source as input")
  np.testing.assert_array_equal(page.shown("result-image"), first)


def test_three_step_chain_saved_from_the_page_replays_with_ip2p_edit(server, browser, env,
                                                                      tmp_path):
  page = _start(server, browser)
  _edit(page, "make the circle blue")
  page.click("continue")
  page.wait_status("Continuing from step 1")
  page.set_number("seed", 5)
  _edit(page, "make it night")
  page.click("continue")
  page.wait_status("Continuing from step 2")
  page.set_number("text-scale", 9)
  final = _edit(page, "make the picture grayscale")

  links = page.wait(lambda: len(page.downloads()) == 2 and page.downloads(), "the downloads")
  assert sorted(links) == ["shapes_128_chain.json", "shapes_128_edited.png"]
  chain = json.loads(fetch(links["shapes_128_chain.json"]))
  assert [(s["instruction"], s["seed"], s["text_scale"]) for s in chain["steps"]] == [
      ("make the circle blue", 0, 7.5), ("make it night", 5, 7.5),
      ("make the picture grayscale", 5, 9.0)]
  path = tmp_path / "chain.json"
  path.write_text(json.dumps(chain))

  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", "ip2p_jax.cli", "edit", EXAMPLE, "--chain",
                      str(path), "-o", str(out)], env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert "the chain's recorded result, pixel for pixel" in r.stdout
  np.testing.assert_array_equal(_pixels(imagelib.load(str(out / "shapes_128.png"))), final)


@pytest.mark.parametrize("name,content,message", [
    ("empty.png", b"", "empty.png: empty file (0 bytes)"),
    ("notes.png", b"not an image at all", "notes.png: not a readable image"),
    ("huge.png", "20 Mpx", "huge.png: 5000x4000 = 20,000,000 pixels exceeds the limit"),
    ("big.png", "33 MB", 'exceed the maximum allowed size of 32.0 Mb: "big.png"'),
])
def test_bad_uploads_are_a_message_in_the_page(server, browser, tmp_path, name, content,
                                               message):
  page = Page(browser, server[0])
  path = tmp_path / name
  if content == "20 Mpx":
    from PIL import Image
    Image.new("L", (5000, 4000)).save(path)  # in a 20 kB file
  elif content == "33 MB":
    path.write_bytes(os.urandom(33 * 2 ** 20))  # refused by Gradio before it reaches us
  else:
    path.write_bytes(content)
  page.upload(str(path))
  if content == "33 MB":
    page.wait(lambda: message in page.text(), "Gradio's message", timeout=60)
    page.reload()
  else:
    assert message in page.wait_status("Error")
    page.clear_upload()
  page.upload(EXAMPLE)  # the page still works
  page.wait_status("Loaded shapes_128.png")
  assert "Traceback" not in open(server[1]).read()
