"""Takes the README's screenshot of ``ip2p demo`` (``examples/demo_screenshot.png``): the
page on the bundled model in headless Chromium after an edit, continued by a second
instruction. Needs the ``demo`` and ``test`` extras and Debian's chromium and
chromium-driver.

  python scripts/demo_screenshot.py [--out examples/demo_screenshot.png] [--steps 50]
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from demo_page import Page, chromium, running_demo, why_no_browser  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(ROOT, "examples", "demo_screenshot.png"))
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()
  if why_no_browser():
    sys.exit(f"demo_screenshot.py: {why_no_browser()}")
  env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
  with tempfile.TemporaryDirectory() as tmp:
    with running_demo(os.path.join(tmp, "demo.log"), env) as url, chromium() as driver:
      page = Page(driver, url)
      page.upload(os.path.join(ROOT, "examples", "shapes_128.png"))
      page.wait_status("Loaded")
      page.set_number("steps", args.steps)
      for k, instruction in enumerate(("make it a negative", "make it night")):
        if k:
          page.click("continue")
          page.wait_status("Continuing")
        page.type_instruction(instruction)
        page.click("run")
        page.wait_status(f'Edited: "{instruction}"')
        page.wait(lambda: page.image_url("result-image"), "the result")
      height = driver.execute_script("return document.body.scrollHeight")
      driver.set_window_size(1280, min(height + 40, 2400))
      page.screenshot(args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
