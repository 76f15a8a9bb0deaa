"""``ip2p demo``: a web page (Gradio) for editing an image step by step.

Upload an image or pick a bundled example, write an instruction, set the steps, the two
guidance scales, the seed (or randomize it) and the sampler, and run: the result shows
beside the input. "Continue from this result" makes it the next edit's input; the
history strip shows the chain (source, then every step), "Undo" takes back the last
"Continue" (its result shows again), and a step picked in the strip starts a new branch
("Branch from selected"; the branches stay in the "Branch" list). "Scale grid" sweeps
text x image scale for the current input, as ``ip2p edit --grid``. The download box
holds the shown image and the chain that made it (JSON that ``ip2p edit --chain``
replays: same settings, same pixels).

Edits go through one worker thread (:class:`Batcher`): requests that arrive together
are edited together, and those sharing a compiled program (same seed, steps, sampler,
guidance on/off and prepared size) run as one batch through the jitted pipeline.
Uploads are checked by ``ip2p_jax.images.load``; an empty, unreadable or huge file is a
message on the page. Nothing is fetched from the network (Gradio's analytics are off,
its fonts are local).
"""

import concurrent.futures
import dataclasses
import json
import logging
import os
import queue
import random
import shutil
import tempfile
import threading
import time
from typing import Callable

from PIL import Image

from ip2p_jax import bundled, editing
from ip2p_jax import images as imagelib
from ip2p_jax.chain import EditChain
from ip2p_jax.editing import EditError, Step

EXAMPLES_DIR = os.path.join(bundled.ASSETS, "demo_examples")
MAX_PIXELS = 16_000_000  # uploads with more pixels are refused (decompression bombs)
MAX_UPLOAD = "32mb"  # Gradio refuses larger files before they reach us
GRID_TEXT_SCALES = (3.0, 5.0, 7.5, 10.0)  # ip2p edit --grid's defaults
GRID_IMAGE_SCALES = (1.0, 1.2, 1.5, 2.0)
log = logging.getLogger(__name__)


def examples() -> list[tuple[str, str]]:
  """The bundled example pictures with an instruction each, as (path, instruction)
  (``scripts/make_demo_examples.py`` writes them)."""
  try:
    with open(os.path.join(EXAMPLES_DIR, "examples.json"), encoding="utf-8") as f:
      entries = json.load(f)
  except (OSError, ValueError):
    return []
  return [(os.path.join(EXAMPLES_DIR, e["image"]), e["instruction"]) for e in entries]


_NOTHING = object()


class Batcher:
  """Runs the pipeline on one worker thread. Edit requests that arrive within ``window``
  seconds of the first one waiting (at most ``max_batch``) are edited by one
  ``editing.edit_images`` call, which batches those that share a compiled program;
  other work (:meth:`run`) runs alone, in turn."""

  def __init__(self, pipe, resolution: int, resize: str = "fit", max_batch: int = 8,
               window: float = 0.05):
    self.pipe, self.resolution, self.resize = pipe, resolution, resize
    self.max_batch, self.window = max_batch, window
    self.texts: dict = {}  # instruction -> text states, encoded once
    self.calls = 0  # compiled edit calls made, for tests and logs
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._work, name="ip2p-demo-batcher", daemon=True)
    self._thread.start()

  def edit(self, image: Image.Image, noise_id: int, step: Step) -> Image.Image:
    """``image`` edited by ``step`` (its sampler named) with noise ``noise_id``."""
    future = concurrent.futures.Future()
    self._queue.put(("edit", (image, noise_id, step), future))
    return future.result()

  def run(self, fn: Callable[[object], object]):
    """``fn(pipe)`` on the worker thread, between batches."""
    future = concurrent.futures.Future()
    self._queue.put(("run", fn, future))
    return future.result()

  def close(self) -> None:
    self._queue.put(None)
    self._thread.join()

  def _work(self) -> None:
    pending = _NOTHING  # a job taken from the queue while batching, run next
    while True:
      job = self._queue.get() if pending is _NOTHING else pending
      pending = _NOTHING
      if job is None:  # close()
        return
      kind, payload, future = job
      if kind == "run":
        self._settle([future], lambda: [payload(self.pipe)])
        continue
      jobs, deadline = [job], time.monotonic() + self.window
      while len(jobs) < self.max_batch:
        try:
          nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
          break
        if nxt is None or nxt[0] != "edit":
          pending = nxt
          break
        jobs.append(nxt)
      self._settle([f for *_, f in jobs], lambda: self._edit([p for _, p, _ in jobs]))

  def _edit(self, requests):
    images, ids, steps = zip(*requests)

    def count(indices, edited):
      self.calls += 1

    if len(self.texts) > 256:
      self.texts.clear()
    return editing.edit_images(self.pipe, list(images), list(steps), list(ids),
                               resolution=self.resolution, resize=self.resize,
                               batch_size=self.max_batch, texts=self.texts, on_batch=count)

  @staticmethod
  def _settle(futures, compute) -> None:
    try:
      results = compute()
    except Exception as e:  # noqa: BLE001 - handed to the waiting requests
      for f in futures:
        f.set_exception(e)
      return
    for f, r in zip(futures, results):
      f.set_result(r)


@dataclasses.dataclass
class Session:
  """One page's state: its branches (edit chains), the one shown, the result not yet
  continued from, the history item picked, and a folder for its downloads."""
  branches: list[EditChain]
  folder: str
  active: int = 0
  pending: tuple[Step, Image.Image] | None = None
  selected: int | None = None

  @property
  def chain(self) -> EditChain:
    return self.branches[self.active]

  def shown_chain(self) -> EditChain:
    """The chain that made the image on show: the steps so far and the pending result."""
    if self.pending is None:
      return self.chain
    shown = self.chain.branch(len(self.chain.steps))
    shown.append(*self.pending)
    return shown


class Demo:
  """The page's actions on a :class:`Session`, without Gradio (tests call them
  directly): each returns the session (``grid``: the picture), or raises
  :class:`EditError` with the message the page shows; the page's handlers
  (:func:`build_app`) write the status line."""

  def __init__(self, batcher: Batcher, model: str | None, default_sampler: str,
               max_pixels: int = MAX_PIXELS):
    self.batcher, self.model, self.default_sampler = batcher, model, default_sampler
    self.max_pixels = max_pixels
    self.root = tempfile.mkdtemp(prefix="ip2p-demo-")

  def open(self, path: str | None) -> Session:
    """A new session on the uploaded file (or example) at ``path``."""
    if not path:
      raise EditError("no file: upload an image or pick an example")
    name = os.path.basename(path)
    try:
      image = imagelib.load(path, self.max_pixels)
    except (imagelib.ImageError, OSError) as e:
      raise EditError(str(e).replace(path, name)) from None
    chain = EditChain(image, name, self.batcher.resolution, self.batcher.resize,
                      model=self.model)
    return Session([chain], tempfile.mkdtemp(dir=self.root))

  def run(self, session: Session | None, step: Step) -> Session:
    """Edits the session's input by ``step``; the result is pending until continued."""
    session = self._need(session)
    if not step.instruction.strip():
      raise EditError("write an instruction first")
    step = dataclasses.replace(step, sampler=step.sampler or self.default_sampler)
    editing.validate_step(step)
    image = self.batcher.edit(session.chain.tip, session.chain.noise_id, step)
    session.pending = (step, image)
    return session

  def proceed(self, session: Session | None) -> Session:
    """"Continue from this result": the pending result becomes the input."""
    session = self._need(session)
    if session.pending is None:
      raise EditError("no result to continue from: run an edit first")
    session.chain.append(*session.pending)
    session.pending = None
    return session

  def undo(self, session: Session | None) -> Session:
    """Takes back the last "Continue": that step's result is pending again."""
    session = self._need(session)
    step, image = session.chain.undo()
    session.pending = (step, image)
    return session

  def select(self, session: Session | None, index: int) -> Session:
    session = self._need(session)
    session.selected = index
    return session

  def branch(self, session: Session | None) -> Session:
    """A new branch from the history item picked (0: the source), made the active one."""
    session = self._need(session)
    if session.selected is None:
      raise EditError("pick an image in the history strip to branch from")
    session.branches.append(session.chain.branch(session.selected))
    session.active, session.pending, session.selected = len(session.branches) - 1, None, None
    return session

  def switch(self, session: Session | None, branch: int) -> Session:
    session = self._need(session)
    if not 0 <= branch < len(session.branches):
      raise EditError(f"no branch {branch + 1}")
    session.active, session.pending, session.selected = branch, None, None
    return session

  def grid(self, session: Session | None, step: Step) -> Image.Image:
    """Text scale (columns) x image scale (rows) for the session's input, with the
    step's instruction, seed, steps and sampler (``ip2p edit --grid``)."""
    session = self._need(session)
    if not step.instruction.strip():
      raise EditError("write an instruction first")
    chain = session.chain
    settings = editing.EditSettings(
        prompt=step.instruction, steps=step.steps, seed=step.seed,
        sampler=step.sampler or self.default_sampler, resolution=chain.resolution,
        resize=chain.resize)
    return self.batcher.run(lambda pipe: editing.scale_grid(
        pipe, chain.tip, settings, GRID_TEXT_SCALES, GRID_IMAGE_SCALES, chain.noise_id))

  def downloads(self, session: Session | None) -> list[str]:
    """The shown image and the chain that made it, written to the session's folder
    (nothing before the first edit)."""
    if session is None:
      return []
    shown = session.shown_chain()
    if not shown.steps:
      return []
    stem = os.path.splitext(shown.name)[0] or "image"
    image_path = os.path.join(session.folder, f"{stem}_edited.png")
    chain_path = os.path.join(session.folder, f"{stem}_chain.json")
    imagelib.save(shown.tip, image_path)
    shown.save(chain_path)
    return [image_path, chain_path]

  def close(self) -> None:
    shutil.rmtree(self.root, ignore_errors=True)

  @staticmethod
  def _need(session):
    if session is None:
      raise EditError("upload an image or pick an example first")
    return session


def history(session: Session | None) -> list[tuple[Image.Image, str]]:
  """The history strip: the source, then each step's output with its settings."""
  if session is None:
    return []
  chain = session.chain
  items = [(_thumbnail(chain.source), f"0. source: {chain.name}")]
  for k, (step, image) in enumerate(zip(chain.steps, chain.images), 1):
    items.append((_thumbnail(image),
                  f"{k}. {step.instruction} (seed {step.seed}, text {step.text_scale:g}, "
                  f"image {step.image_scale:g}, {step.steps} {step.sampler})"))
  return items


def _thumbnail(image: Image.Image, side: int = 256) -> Image.Image:
  if max(image.size) <= side:
    return image
  small = image.copy()
  small.thumbnail((side, side), Image.Resampling.LANCZOS)
  return small


def branch_names(session: Session | None) -> list[tuple[str, int]]:
  if session is None:
    return []
  return [(f"branch {k + 1}: {len(c.steps)} step(s)", k) for k, c in enumerate(session.branches)]


def build_app(demo: Demo, title: str = "ip2p_jax: InstructPix2Pix"):
  """The Gradio page over ``demo``'s actions."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  import gradio as gr
  from ip2p_jax.diffusion.schedules import SAMPLERS
  from ip2p_jax.diffusion.schedules import DEFAULT_STEPS

  example_list = examples()
  with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
    gr.Markdown(f"## {title}\nEdit an image by instructions, one step at a time. "
                "Model: `" + (demo.model or "?") + "`")
    state = gr.State(None)
    with gr.Row():
      with gr.Column(scale=1):
        upload = gr.File(label="Upload an image", type="filepath", height=140,
                         elem_id="upload")
      with gr.Column(scale=2):
        with gr.Row():
          source_view = gr.Image(label="Input: what the next edit changes", type="pil",
                                 format="png", interactive=False, height=320,
                                 elem_id="input-image")
          result_view = gr.Image(label="Result", type="pil", format="png", interactive=False,
                                 height=320, elem_id="result-image")
    instruction = gr.Textbox(label="Instruction", placeholder="make it look like winter",
                             elem_id="instruction")
    if example_list:
      gr.Examples([[p, text] for p, text in example_list], inputs=[upload, instruction],
                  label="Bundled examples")
    with gr.Row():
      steps = gr.Slider(1, 100, value=DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
      text_scale = gr.Slider(1.0, 15.0, value=7.5, step=0.1, label="Text scale (s_T)",
                             elem_id="text-scale")
      image_scale = gr.Slider(1.0, 5.0, value=1.5, step=0.05, label="Image scale (s_I)",
                              elem_id="image-scale")
    with gr.Row():
      seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=editing.MAX_SEED,
                       elem_id="seed")
      randomize = gr.Checkbox(False, label="Randomize seed", elem_id="randomize")
      sampler = gr.Dropdown(list(SAMPLERS), value=demo.default_sampler, label="Sampler",
                            elem_id="sampler")
    with gr.Row():
      run_button = gr.Button("Edit", variant="primary", elem_id="run")
      continue_button = gr.Button("Continue from this result", elem_id="continue")
      undo_button = gr.Button("Undo", elem_id="undo")
      branch_button = gr.Button("Branch from selected", elem_id="branch")
      grid_button = gr.Button("Scale grid", elem_id="grid")
    status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
    gallery = gr.Gallery(label="History (pick one to branch from it)", columns=8, height=200,
                         fit_columns=False, object_fit="contain", allow_preview=False,
                         format="png", elem_id="history")
    branches = gr.Dropdown([], label="Branch", elem_id="branches")
    files = gr.File(label="Download: the image and its chain (ip2p edit --chain)",
                    file_count="multiple", interactive=False, elem_id="downloads")
    grid_view = gr.Image(label="Scale grid: text scale (columns) x image scale (rows)",
                         type="pil", format="png", interactive=False, elem_id="grid-image")

    view = [state, source_view, result_view, gallery, branches, files, status]

    def show(session, message):
      shown = None if session is None or session.pending is None else session.pending[1]
      source = None if session is None else session.chain.tip
      names = branch_names(session)
      picked = session.active if session is not None else None
      return (session, source, shown, history(session),
              gr.update(choices=names, value=picked), demo.downloads(session), message)

    def guarded(action):
      """Runs ``action``; an :class:`EditError` (or any failure) is a status message,
      the page keeps what it showed."""
      def handler(session, *args):
        try:
          session, message = action(session, *args)
        except (EditError, ValueError, OSError) as e:
          message = f"**Error:** {e}"
        except Exception as e:  # noqa: BLE001 - the page shows it; the log has the traceback
          log.exception("demo action failed")
          message = f"**Error:** {type(e).__name__}: {e}"
        else:
          return show(session, message)
        return (session,) + (gr.update(),) * (len(view) - 2) + (message,)
      return handler

    def make_step(text, n, t, i, s, pick):
      return Step(text or "", seed=int(s or 0), text_scale=float(t), image_scale=float(i),
                  steps=int(n), sampler=pick)

    def on_upload(session, path):
      if not path:
        return session, "Upload an image or pick an example."
      session = demo.open(path)
      w, h = session.chain.source.size
      return session, f"Loaded {session.chain.name} ({w}x{h})."

    def on_run(session, text, n, t, i, s, rand, pick):
      s = random.randint(0, editing.MAX_SEED) if rand else int(s or 0)
      start = time.perf_counter()
      session = demo.run(session, make_step(text, n, t, i, s, pick))
      step = session.pending[0]
      return session, (f"Edited: \"{step.instruction}\" (seed {step.seed}) in "
                       f"{time.perf_counter() - start:.1f} s.")

    def seed_of(session, s):
      pending = session.pending if session is not None else None
      return pending[0].seed if pending is not None else s

    def on_continue(session):
      session = demo.proceed(session)
      return session, f"Continuing from step {len(session.chain.steps)}."

    def on_undo(session):
      session = demo.undo(session)
      return session, f"Undone: back to step {len(session.chain.steps)}."

    def on_branch(session):
      session = demo.branch(session)
      return session, (f"Branch {session.active + 1} from step {len(session.chain.steps)}.")

    def on_switch(session, k):
      if k is None or session is None or k == session.active:
        return session, gr.update()
      session = demo.switch(session, int(k))
      return session, f"Branch {session.active + 1}."

    def on_select(session, evt: gr.SelectData):
      try:
        return demo.select(session, int(evt.index)), f"Picked history item {evt.index}."
      except EditError as e:
        return session, f"**Error:** {e}"

    def on_grid(session, text, n, t, i, s, pick):
      try:
        grid = demo.grid(session, make_step(text, n, t, i, s, pick))
      except (EditError, ValueError) as e:
        return gr.update(), f"**Error:** {e}"
      return grid, "Scale grid: the cell at your scales is the edit you would get."

    controls = [instruction, steps, text_scale, image_scale, seed]
    upload.change(guarded(on_upload), [state, upload], view)
    run_button.click(guarded(on_run), [state, *controls, randomize, sampler], view,
                     concurrency_limit=demo.batcher.max_batch).then(
        seed_of, [state, seed], seed)
    continue_button.click(guarded(on_continue), [state], view)
    undo_button.click(guarded(on_undo), [state], view)
    branch_button.click(guarded(on_branch), [state], view)
    branches.input(guarded(on_switch), [state, branches], view)
    gallery.select(on_select, [state], [state, status])
    grid_button.click(on_grid, [state, *controls, sampler], [grid_view, status])
  return app


def launch(folder: str, host: str = "127.0.0.1", port: int = 7860,
           resolution: int | None = None, max_batch: int = 8, max_pixels: int = MAX_PIXELS,
           block: bool = True):
  """Loads the InstructPix2Pix folder and serves the page at ``host:port``; returns the
  Gradio app (``block=False``: at once, the server running; ``app.close()`` stops it)."""
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
  from ip2p_jax.checkpoints.fingerprint import folder_hash
  from ip2p_jax.pipelines import InstructPix2PixPipeline
  pipe = InstructPix2PixPipeline.from_pretrained(folder)
  pipe.set_progress_bar_config(disable=True)
  native = (pipe.unet.config.sample_size or 64) * pipe.vae_scale_factor
  batcher = Batcher(pipe, resolution or native, max_batch=max_batch)
  demo = Demo(batcher, folder_hash(folder), pipe.sampler_and_levels(None, 1)[0], max_pixels)
  app = build_app(demo)
  app.queue(default_concurrency_limit=1)
  try:
    app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD,
               allowed_paths=[EXAMPLES_DIR], ssr_mode=False, show_error=False,
               prevent_thread_lock=not block, footer_links=["api", "settings"])
  finally:
    if block:
      batcher.close()
      demo.close()
  return app
