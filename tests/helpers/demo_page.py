"""A running ``ip2p demo`` and a headless Chromium driving it (selenium): used by
tests/test_demo_browser.py and scripts/demo_screenshot.py.

Chromium is Debian's (``apt-get install chromium chromium-driver``), started with a
fresh profile and every background service off, since the network is closed.
"""
import contextlib
import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,1500")


def why_no_browser() -> str | None:
  """Why the browser test cannot run here, or None."""
  for module, install in (("gradio", 'pip install -e ".[demo]"'),
                          ("selenium", 'pip install -e ".[test]"')):
    if importlib.util.find_spec(module) is None:
      return f"{module} is not installed ({install})"
  for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
    if not os.access(path, os.X_OK):
      return (f"{path} not found: Debian's {package} could not be installed here "
              "(apt-get install -y chromium chromium-driver)")
  return None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_demo(log_path: str, env: dict, *args: str, timeout: float = 900):
  """``ip2p demo ARGS`` on a free port of 127.0.0.1; yields its URL once the page
  answers. Stopped (SIGINT, as Ctrl-C) when the block ends."""
  port = free_port()
  url = f"http://127.0.0.1:{port}/"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "ip2p_jax.cli", "demo", "--port", str(port),
                             *args], env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + timeout
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"ip2p demo exited ({proc.returncode}): {open(log_path).read()}")
      try:
        urllib.request.urlopen(url, timeout=5).read()
        break
      except OSError:
        if time.time() > deadline:
          raise RuntimeError(f"ip2p demo did not answer in {timeout} s: "
                             f"{open(log_path).read()}") from None
        time.sleep(1)
    yield url
  finally:
    proc.send_signal(2)
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


@contextlib.contextmanager
def chromium():
  """A headless Chromium under chromedriver, with a profile of its own."""
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  profile = tempfile.mkdtemp(prefix="chromium-profile-")
  for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  try:
    yield driver
  finally:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def fetch(url: str) -> bytes:
  with urllib.request.urlopen(url, timeout=60) as r:
    return r.read()


class Page:
  """The demo page in ``driver``: fill the controls, press buttons, read what it shows."""

  def __init__(self, driver, url: str):
    self.driver, self.url = driver, url
    self.reload()

  def reload(self) -> None:
    """Opens the page afresh: a new session."""
    self.driver.get(self.url)
    self.wait(lambda: self.status(), "the page to load")

  def text(self) -> str:
    """All the text the page shows (Gradio's own messages included)."""
    from selenium.webdriver.common.by import By
    return self.driver.find_element(By.TAG_NAME, "body").text

  def _find(self, css):
    from selenium.webdriver.common.by import By
    return self.driver.find_elements(By.CSS_SELECTOR, css)

  def _one(self, css):
    """The first element matching ``css``, waited for (the page renders as it loads)."""
    return self.wait(lambda: self._find(css), css, timeout=120)[0]

  def wait(self, condition, what: str, timeout: float = 600):
    deadline = time.time() + timeout
    while time.time() < deadline:
      value = condition()
      if value:
        return value
      time.sleep(0.2)
    raise TimeoutError(f"waited {timeout} s for {what}; status: {self.status()!r}")

  def status(self) -> str:
    found = self._find("#status")
    return found[0].text if found else ""

  def wait_status(self, fragment: str, timeout: float = 600) -> str:
    """Waits until the status line holds ``fragment`` (an error line fails at once).

    While Gradio works on the next event it overlays "processing | t/ts" on the status
    and keeps the previous text under it, so an error shown then is the last event's
    (seen in a full-suite run on a loaded machine): only a settled status is judged."""
    def seen():
      text = self.status()
      if "Error" in text and "Error" not in fragment and not text.startswith("processing"):
        raise AssertionError(f"the page says: {text}")
      return text if fragment in text else None
    return self.wait(seen, f"status {fragment!r}", timeout)

  def upload(self, path: str) -> None:
    self._one("#upload input[type=file]").send_keys(os.path.abspath(path))

  def clear_upload(self) -> None:
    """Removes the uploaded file (the component's clear button), ready for another."""
    for button in self._find("#upload button[aria-label='Clear']"):
      button.click()
    self.wait(lambda: self._find("#upload input[type=file]"), "an empty upload box")

  def type_instruction(self, text: str) -> None:
    box = self._one("#instruction textarea")
    box.clear()
    box.send_keys(text)

  def set_number(self, elem_id: str, value) -> None:
    """A slider's or number box's value, typed into its number field."""
    from selenium.webdriver.common.keys import Keys
    field = self._one(f"#{elem_id} input[type=number]")
    field.clear()
    field.send_keys(str(value), Keys.TAB)
    self.wait(lambda: field.get_attribute("value") == str(value), f"{elem_id} = {value}")

  def click(self, elem_id: str) -> None:
    self._one(f"#{elem_id}").click()

  def image_url(self, elem_id: str) -> str | None:
    found = self._find(f"#{elem_id} img")
    return found[0].get_attribute("src") if found else None

  def shown(self, elem_id: str) -> np.ndarray | None:
    """The pixels of the image the page shows in ``elem_id`` (fetched from its URL)."""
    url = self.image_url(elem_id)
    if url is None:
      return None
    return np.asarray(Image.open(io.BytesIO(fetch(url))).convert("RGB"))

  def downloads(self) -> dict[str, str]:
    """File name -> URL of the download box's links."""
    return {a.get_attribute("href").rsplit("/", 1)[-1]: a.get_attribute("href")
            for a in self._find("#downloads a") if a.get_attribute("href")}

  def screenshot(self, path: str) -> None:
    self.driver.save_screenshot(path)
