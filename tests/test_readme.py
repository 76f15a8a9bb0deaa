"""README.md's snippets run as written.

Python: every ```python block, in order, in one fresh interpreter (as a notebook runs them).
Shell: every command of every ```bash block, by bash, each block's in order (blocks side by
side), in one working folder that holds what the commands name:

  ip2p-model/, MODEL/   a tiny random InstructPix2Pix folder saved by diffusers (where the
                        README names the released checkpoint, or "a model")
  SD_FOLDER/            a tiny random Stable Diffusion folder; CLIP_FOLDER/ a tiny CLIP;
  GPT_FOLDER/           a tiny GPT-2 fitted here to write edits in the paper's format
  photo.jpg, shape.png  pictures; striped/ the customization examples its comment describes
  path/to/...           an original-format folder, an HF parquet export, images with .txt
  captions.txt          two captions
  examples/ scripts/ configs/   the repository's (links)

Only what must change to run in a test is changed (SHRINK, each with its reason): sizes
and lengths meant for real compute, through the commands' own documented flags (argparse
keeps the last value of a repeated flag). What cannot run here is checked instead
(CHECKED): the install and the test-suite commands are what .ci/run runs on every CI
build; the hub download needs the network (the command and its flags are checked with
``hf download --help``); the 8-GPU training command is parsed by scripts/train.py's own
flag parser against its config; the pod and SLURM commands are run by
tests/test_pod_scale.py (a stand-in gcloud, the same flag parser); the default model's
retraining (hours) runs with ``python`` recorded instead of run, and each training command
it would run is parsed the same way.

A command the README gains that none of these rules names runs as written, so a new
snippet is tested without editing this file (and fails here if it needs a file the folder
lacks).
"""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# scripts/train.py's own flag parsing, without training (run in the command's folder)
PARSE_TRAIN_FLAGS = """
import json, runpy, sys
sys.path.insert(0, ".")
ns = runpy.run_path("scripts/train.py", run_name="readme_check")
ns["parse_flags"](sys.argv)
from absl import flags
print(json.dumps({"workdir": flags.FLAGS.workdir, "config": flags.FLAGS.config.to_dict()},
                 default=str))
"""
SHELLS = ("bash", "sh", "shell")

# Python: sizes meant for a 512 px model shrink with the 32 px-native tiny one.
PY_SMALLER = {"resolution=512": "resolution=32", "(512, 384)": "(32, 24)"}

# (command prefix, flags appended, why)
SHRINK = [
    ("ip2p data shapes", "--num 6 --heldout 2", "20,000 + 500 rendered triplets take minutes"),
    ("ip2p synth", "--samples 2 --keep 1 --steps 3 --batch-size 2",
     "100 pairs x 100 steps per caption is the paper's scale, hours on a CPU"),
    ("ip2p synth --captions captions.txt --out synth/ --samples",
     "--min-sim-0 -1 --min-sim-1 -1 --min-sim-direction -1 --min-sim-image -1",
     "3-step pairs are noise to CLIP: it would reject them all, and the import after it "
     "would have nothing to import (which is an error)"),
    ("ip2p customize", "--steps 2", "250 optimizer steps of the bundled model"),
]
# (command prefix, old, new, why): the README's two `ip2p synth` commands are alternatives
# writing one folder; run one after the other, the second would only resume the first.
RENAME = [("ip2p synth --captions captions.txt --out synth/ --model SD_FOLDER", "--out synth/",
           "--out synth_lm/", "alternatives writing one folder")]
# Servers: started as written plus the flags given (why), asked for their page, stopped.
SERVERS = {"ip2p demo": ("--port {port}", "7860 may be taken on a test machine; the README's "
                         "URL names the default port", ("/", "/config"))}
# Commands checked, not run: regex -> why.
CHECKED = {
    r"^python3 -m venv ": "the install: .ci/run runs it on every CI build",
    r"^python -m pytest": "the whole test suite, of which this test is part: .ci/run runs it",
    r"^(hf|huggingface-cli) download ": "needs the Hugging Face hub",
    r"^python scripts/train\.py --config=configs/sd15_": "Stable Diffusion 1.5 on 8 GPUs",
    r"^(IP2P_STEPS=\d+ )?\./scripts/train_default_model\.sh": "retrains the default model "
    "(hours): run below with python recorded instead of run",
    r"^TPU=\S+ ZONE=\S+ .*\./scripts/tpu_pod\.sh |^srun ": "a TPU pod, a SLURM cluster: run by "
    "tests/test_pod_scale.py (test_the_readme_pod_and_slurm_commands_name_only_what_exists)",
}
POD_TEST = "test_the_readme_pod_and_slurm_commands_name_only_what_exists"

STUB = """#!{python}
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


def readme() -> str:
  return open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def blocks() -> list[tuple[str, str]]:
  """(language, text) of every fenced block."""
  return re.findall(r"^```(\w*)\n(.*?)^```[ \t]*$", readme(), re.S | re.M)


def python_snippets() -> list[str]:
  return [text for lang, text in blocks() if lang == "python"]


def _strip_comment(line: str) -> str:
  quote = None
  for i, ch in enumerate(line):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch == "#" and (i == 0 or line[i - 1].isspace()):
      return line[:i]
  return line


def shell_blocks() -> list[list[str]]:
  """The commands of each shell block, continuation lines joined, comments dropped."""
  out = []
  for lang, text in blocks():
    if lang in SHELLS:
      lines = (" ".join(_strip_comment(l).split()) for l in re.sub(r"\\\n\s*", " ", text).splitlines())
      out.append([command for command in lines if command])
  return out


def shell_commands() -> list[str]:
  return [command for block in shell_blocks() for command in block]


def checked(command: str) -> str | None:
  return next((why for pattern, why in CHECKED.items() if re.search(pattern, command)), None)


def as_run(command: str) -> str:
  """The command with SHRINK's and RENAME's changes."""
  for prefix, old, new, _ in RENAME:
    if command.startswith(prefix):
      command = command.replace(old, new)
  for prefix, extra, _ in SHRINK:
    if command.startswith(prefix):
      command = f"{command} {extra}"
  return command


# -- the working folder --------------------------------------------------------------------

LM_EXAMPLES = {  # caption -> the completion GPT_FOLDER's tiny GPT-2 memorises
    "a small red circle on a blue background":
        "make the circle green\n%%\na small green circle on a blue background\nEND",
    "a photo of a cat on a chair":
        "turn the cat into a dog\n%%\na photo of a dog on a chair\nEND",
}


def _picture(path, size, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _jpeg(color) -> bytes:
  import io
  buf = io.BytesIO()
  Image.new("RGB", (24, 16), color).save(buf, "JPEG")
  return buf.getvalue()


def _build(ws, model):
  """Everything the README's commands name, in ``ws``."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from clip_fixtures import save_tiny_clip
  from lm_fixtures import save_tiny_lm
  from pipeline_fixtures import save_sd
  for name in ("examples", "scripts", "configs"):
    os.symlink(os.path.join(ROOT, name), ws / name)
  for name in ("ip2p-model", "MODEL"):
    os.symlink(model, ws / name)
  save_sd(ws / "SD_FOLDER")
  save_tiny_clip(ws / "CLIP_FOLDER")
  save_tiny_lm(ws / "GPT_FOLDER", LM_EXAMPLES)
  _picture(ws / "photo.jpg", (60, 45), 0)
  shutil.copy(os.path.join(ROOT, "examples", "shapes_128.png"), ws / "shape.png")
  # striped/: the metadata.jsonl the customize snippet's comment describes
  (ws / "striped").mkdir()
  with open(ws / "striped" / "metadata.jsonl", "w", encoding="utf-8") as f:
    for i in range(2):
      a = np.asarray(Image.open(ws / "shape.png").convert("RGB"))
      striped = a.copy()
      striped[::8] = 255
      Image.fromarray(np.roll(a, 16 * i, axis=1)).save(ws / "striped" / f"a{i}.png")
      Image.fromarray(np.roll(striped, 16 * i, axis=1)).save(ws / "striped" / f"a{i}_out.png")
      f.write(json.dumps({"input_image": f"a{i}.png", "edited_image": f"a{i}_out.png",
                          "instruction": "make it <new1>"}) + "\n")
  # path/to/clip-filtered-dataset: the original release's folder format
  orig = ws / "path" / "to" / "clip-filtered-dataset"
  (orig / "0000").mkdir(parents=True)
  (orig / "0000" / "prompt.json").write_text(json.dumps(
      {"edit": "make it red", "input": "a blue square", "output": "a red square"}))
  (orig / "0000" / "7_0.jpg").write_bytes(_jpeg("blue"))
  (orig / "0000" / "7_1.jpg").write_bytes(_jpeg("red"))
  (orig / "seeds.json").write_text(json.dumps([["0000", [7]]]))
  # path/to/parquet: the Hugging Face export's columns
  (ws / "path" / "to" / "parquet").mkdir()
  img = lambda b: {"bytes": b, "path": None}
  pq.write_table(pa.table({
      "original_prompt": ["a blue square"], "original_image": [img(_jpeg("blue"))],
      "edit_prompt": ["make it green"], "edited_prompt": ["a green square"],
      "edited_image": [img(_jpeg("green"))]}), ws / "path" / "to" / "parquet" / "train.parquet")
  # path/to/images_and_txt: images with a caption beside each
  caps = ws / "path" / "to" / "images_and_txt"
  caps.mkdir()
  for i, color in enumerate(("red", "yellow")):
    (caps / f"{i}.jpg").write_bytes(_jpeg(color))
    (caps / f"{i}.txt").write_text(f"a {color} picture\n")
  (ws / "captions.txt").write_text("\n".join(LM_EXAMPLES) + "\n")
  # train_default_model.sh's python, recorded instead of run
  (ws / "python-stub").mkdir()
  (ws / "python-stub" / "python").write_text(STUB.format(python=sys.executable))
  os.chmod(ws / "python-stub" / "python", 0o755)


def _env(ws, stub_log=None, *stub_dirs):
  env = {**os.environ, "STUB_LOG": str(stub_log), "PYTHONUNBUFFERED": "1",
         # one persistent compilation cache for all commands, as a user's machine has
         "IP2P_COMPILATION_CACHE": str(ws / ".xla_cache")}
  env["PATH"] = os.pathsep.join([*map(str, stub_dirs), os.path.dirname(sys.executable),
                                 env.get("PATH", "")])
  return env


def bash(ws, command, env, timeout=1800):
  return subprocess.run(["bash", "-c", command], cwd=ws, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model):
  ws = tmp_path_factory.mktemp("readme")
  _build(ws, model)
  return ws


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def serve(ws, command: str, env, timeout=1800) -> subprocess.CompletedProcess:
  """Starts a server command (SERVERS), waits for its page on 127.0.0.1, stops it with
  SIGINT (Ctrl-C). stdout: JSON {path: text} of the server's paths (SERVERS); returncode
  0 if they answered."""
  import signal
  import time
  import urllib.request
  prefix = next(p for p in SERVERS if command.startswith(p))
  port = _free_port()
  log = ws / f"server_{port}.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(["bash", "-c", f"exec {command} {SERVERS[prefix][0].format(port=port)}"],
                            cwd=ws, env=env, stdout=f, stderr=subprocess.STDOUT)
  page, deadline = None, time.time() + timeout
  get = lambda path: urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60).read()
  try:
    while page is None and proc.poll() is None and time.time() < deadline:
      try:
        page = {path: get(path).decode("utf-8", "replace") for path in SERVERS[prefix][2]}
      except OSError:
        time.sleep(2)
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      proc.wait(60)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  ok = page is not None
  return subprocess.CompletedProcess(command, 0 if ok else proc.returncode or 1,
                                     json.dumps(page) if ok else "", open(log).read())


@pytest.fixture(scope="module")
def shell(workspace):
  """Runs every shell command the README has: {command: CompletedProcess}. Each block's
  commands in order; blocks (independent sections) side by side, a few at a time."""
  from concurrent.futures import ThreadPoolExecutor
  ws = workspace

  def run(command):
    if any(command.startswith(p) for p in SERVERS):
      return serve(ws, as_run(command), {**_env(ws), "GRADIO_ANALYTICS_ENABLED": "False"})
    return bash(ws, as_run(command), _env(ws))

  def run_block(commands):
    return {c: run(c) for c in commands if not checked(c)}
  results = {}
  with ThreadPoolExecutor(max_workers=max(1, min(3, os.cpu_count() or 1))) as pool:
    for part in pool.map(run_block, shell_blocks()):
      results.update(part)
  return ws, results


def _ok(shell, prefix: str):
  """The results of the commands starting with ``prefix`` (at least one), each succeeded."""
  _, results = shell
  found = [(c, r) for c, r in results.items() if c.startswith(prefix)]
  assert found, f"README has no command starting {prefix!r}"
  for command, r in found:
    assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
  return [r for _, r in found]


# -- which blocks there are ---------------------------------------------------------------

def test_every_fenced_block_is_one_this_file_or_test_cli_help_checks():
  plain = []
  for lang, text in blocks():
    assert lang in ("python", "", *SHELLS), f"README block of unknown language {lang!r}"
    if not lang:
      plain.append(text)
  # plain blocks: the synopses (tests/test_cli_help.py) and the layout (below)
  assert sum(t.startswith("ip2p edit ") for t in plain) == 1
  assert sum(t.startswith("ip2p eval ") for t in plain) == 1
  assert sum(t.startswith("ip2p_jax/\n") for t in plain) == 1
  assert len(plain) == 3, [t.splitlines()[0] for t in plain]
  commands = shell_commands()
  for prefix, _, _ in SHRINK:  # no stale substitution
    assert any(c.startswith(prefix) for c in commands), prefix
  for prefix, old, _, _ in RENAME:
    assert any(c.startswith(prefix) and old in c for c in commands), prefix
  for pattern in CHECKED:
    assert any(re.search(pattern, c) for c in commands), pattern


def test_every_shell_command_runs(shell):
  _, results = shell
  failed = {c: (r.stdout[-1500:], r.stderr[-2500:]) for c, r in results.items() if r.returncode}
  assert not failed, json.dumps(failed, indent=1)
  assert len(results) + sum(bool(checked(c)) for c in shell_commands()) == \
      len(shell_commands())


# -- what the commands made ---------------------------------------------------------------

def test_the_first_edit_uses_the_bundled_model(shell):
  ws, _ = shell
  (r,) = _ok(shell, "ip2p edit examples/shapes_128.png")
  assert "edited 1," in r.stdout
  out = Image.open(ws / "out" / "shapes_128.png")
  assert out.size == (128, 128)
  from ip2p_jax import bundled
  from ip2p_jax.checkpoints.fingerprint import folder_hash
  assert json.loads(out.info["ip2p_jax"])["model"] == folder_hash(bundled.DEFAULT_MODEL)
  # an edit, not a VAE round trip of the input (which differs by ~4 of 255 on average;
  # the bundled model's edit of this example differs by ~20)
  change = np.abs(np.asarray(out.convert("RGB"), np.int16)
                  - np.asarray(Image.open(ws / "shape.png").convert("RGB"), np.int16))
  assert change.mean() > 8, change.mean()


def test_the_demo_serves_its_page_on_the_bundled_model(shell):
  (r,) = _ok(shell, "ip2p demo")
  pages = json.loads(r.stdout)
  assert "<html" in pages["/"].lower()
  config = json.loads(pages["/config"])  # what the page is built from
  assert config["title"] == "ip2p_jax: InstructPix2Pix"
  labels = {c.get("props", {}).get("label") for c in config["components"]}
  assert {"Instruction", "Steps", "Sampler", "Result"} <= labels, labels


def _assert_edited(edited: Image.Image, source) -> None:
  """An edit, not the input handed back: mean change over 1 level of 255 from the source
  resized to the output's size."""
  given = Image.open(source).convert("RGB").resize(edited.size)
  assert np.abs(np.asarray(edited, np.int16) - np.asarray(given, np.int16)).mean() > 1.0


def test_a_model_folder_edits_a_photo_at_the_models_size(shell):
  """`ip2p edit` scales the photo to the model's native size (its longest side) and
  keeps its 4:3 shape: the released 512 px model writes 512x384, the tiny stand-in its
  own size."""
  ws, _ = shell
  (r,) = _ok(shell, "ip2p edit photo.jpg")
  assert "edited 1," in r.stdout
  unet = json.load(open(ws / "ip2p-model" / "unet" / "config.json"))
  vae = json.load(open(ws / "ip2p-model" / "vae" / "config.json"))
  native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
  edited = Image.open(ws / "watercolor" / "photo.png").convert("RGB")
  assert edited.size == (native, native * 45 // 60)
  _assert_edited(edited, ws / "photo.jpg")


def test_customize_then_edit_with_the_adapter(shell):
  ws, _ = shell
  _ok(shell, "ip2p customize")
  unet_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                   os.walk(os.path.join(ROOT, "ip2p_jax", "assets", "default_model", "unet"))
                   for f in fs)
  assert 0 < os.path.getsize(ws / "striped.safetensors") <= 0.05 * unet_bytes
  (r,) = _ok(shell, "ip2p edit shape.png")
  assert "edited 1," in r.stdout
  record = json.dumps(Image.open(ws / "striped_edits" / "shape.png").info)
  assert "@0.8" in record  # the adapter and its scale are part of the image's model id


def test_data_commands(shell):
  from ip2p_jax.data import builders, latent_cache
  ws, _ = shell
  (r,) = _ok(shell, "ip2p data shapes")
  assert "train_written: 6" in r.stdout and "heldout_written: 2" in r.stdout
  imports = _ok(shell, "ip2p data import --format ")
  assert len(imports) == 4  # three formats, and the synth output
  for r, out, n in zip(imports, ("ip2p_data", "hf_data", "caption_data"), (1, 1, 2)):
    assert f"written: {n}" in r.stdout, r.stdout
    (dataset,) = {os.path.dirname(p) for p in glob.glob(f"{ws}/{out}/**/*.array_record*",
                                                         recursive=True)}
    assert len(builders.open_split(dataset, "train")) == n
  _ok(shell, "ip2p data show")
  assert Image.open(ws / "data" / "contact_sheet.png").size[1] >= 128
  _ok(shell, "ip2p data cache")
  assert len(latent_cache.LatentCacheSource(str(ws / "latents.array_record"))) == 6


def test_synth_commands(shell):
  ws, _ = shell
  for r in _ok(shell, "ip2p synth"):
    assert "generated: 4" in r.stdout, r.stdout  # 2 captions x 2 samples
  for out in ("synth", "synth_lm"):
    assert json.load(open(ws / out / "synth_report.json"))["captions"] == 2
    assert (ws / out / "contact_sheet.png").is_file()
  # the tiny GPT-2 wrote the instructions, in the paper's format, parsed
  edits = {json.load(open(p))["caption"]: json.load(open(p))["edit"]
           for p in (ws / "synth_lm").glob("*/prompt.json")}
  assert edits == {c: completion.split("\n")[0] for c, completion in LM_EXAMPLES.items()}
  # the builtin generator's kept pairs (thresholds off) import as the original format
  (r,) = _ok(shell, "ip2p data import --format ip2p-folder synth/")
  assert "written: 2" in r.stdout


def test_the_tiny_training_run_exports_a_model(shell):
  ws, _ = shell
  (r,) = _ok(shell, "python scripts/train.py --config=configs/tiny_ip2p.py")
  assert "finished at step 4" in r.stdout  # configs/tiny_ip2p.py's length, as written
  # the console: one progress line per logged step, library INFO logs silenced
  steps = [l for l in r.stdout.splitlines() if " ex/s ETA " in l]
  assert [l.split(" step ")[1].split()[0] for l in steps] == ["1/4", "2/4", "3/4", "4/4"]
  info = [l for l in (r.stdout + r.stderr).splitlines() if re.match(r"(I\d{4} |INFO:)", l)]
  assert not info, info[:5]
  assert (ws / "runs" / "tiny" / "export" / "model_index.json").is_file()


# -- what is checked instead of run -------------------------------------------------------

def test_install_and_test_commands_are_what_ci_runs():
  ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
  (install,) = [c for c in shell_commands() if c.startswith("python3 -m venv")]
  for part in install.split(" && "):
    if part.startswith(". "):  # activating the venv: .ci/run activates its own
      assert re.search(r'^\. "\$venv/bin/activate"$', ci, re.M)
    elif part.startswith("python3 -m venv"):
      assert re.search(r"^python3 -m venv ", ci, re.M)
    else:
      assert re.search(rf"^{re.escape(part)}", ci, re.M), part
  setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
  extras = setup[setup.index("extras_require"):]
  for extra in re.search(r"\.\[([\w,]+)\]", install).group(1).split(","):
    assert re.search(rf'^\s*"{extra}": \[', extras, re.M), f"setup.py has no [{extra}] extra"
  for command in shell_commands():
    if command.startswith("python -m pytest"):
      assert re.search(rf"^{re.escape(command)}$", ci, re.M), command


def test_the_download_command_exists_with_its_flag():
  (download,) = [c for c in shell_commands() if re.search(r"^(hf|huggingface-cli) download", c)]
  argv = shlex.split(download)
  assert shutil.which(argv[0]), f"{argv[0]} is not installed (huggingface_hub's CLI is `hf`)"
  r = subprocess.run([argv[0], "download", "--help"], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  for flag in (a for a in argv if a.startswith("--")):
    assert flag in r.stdout, flag
  # the next command edits with the folder it makes
  assert argv[argv.index("--local-dir") + 1] == "ip2p-model"
  assert any(c.startswith("ip2p edit") and "--model ip2p-model" in c for c in shell_commands())


def _train_config(ws, argv: list[str]) -> dict:
  """scripts/train.py's flags parsed as it would (config and workdir), in ``ws``."""
  i = argv.index("scripts/train.py")
  r = subprocess.run([sys.executable, "-c", PARSE_TRAIN_FLAGS, *argv[i + 1:]], cwd=ws,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, f"{shlex.join(argv)}: {r.stderr[-2000:]}"
  return json.loads(r.stdout.splitlines()[-1])


def _assert_overrides(parsed: dict, argv: list[str]):
  """Every --config.KEY=VALUE of the command is in the parsed config."""
  for arg in argv:
    m = re.fullmatch(r"--config\.([\w.]+)=(.*)", arg)
    if m:
      value = parsed["config"]
      for key in m.group(1).split("."):
        value = value[key]
      assert str(value) == m.group(2), (arg, value)


def test_training_commands_for_big_machines_parse_with_train_flags(workspace):
  commands = [c for c in shell_commands() if re.search(r"^python scripts/train\.py "
                                                       r"--config=configs/sd15_", c)]
  assert commands
  for command in commands:
    argv = shlex.split(command)
    parsed = _train_config(workspace, argv)
    _assert_overrides(parsed, argv)
    assert parsed["config"]["stage"] == "instruct_pix2pix"


def test_the_pod_and_slurm_commands_are_run_by_test_pod_scale():
  """README's "Several hosts" commands are run by tests/test_pod_scale.py (a stand-in
  gcloud, train.py's flag parser): that test exists and reads that section."""
  pod_tests = open(os.path.join(ROOT, "tests", "test_pod_scale.py"), encoding="utf-8").read()
  assert f"def {POD_TEST}(" in pod_tests
  assert '_readme_section("Several hosts: TPU pods and SLURM")' in pod_tests
  section = readme().split("### Several hosts: TPU pods and SLURM", 1)[1].split("\n## ", 1)[0]
  pod = [c for c in shell_commands() if c in " ".join(re.sub(r"\\\n\s*", " ", section).split())]
  assert pod and all(checked(c) for c in pod)


def test_default_model_script_runs_every_stage_with_valid_flags(workspace):
  ws = workspace
  (command,) = [c for c in shell_commands() if "train_default_model.sh" in c]
  log = ws / "python_calls.jsonl"
  r = bash(ws, command, _env(ws, log, ws / "python-stub"), timeout=120)
  assert r.returncode == 0, r.stderr
  calls = [json.loads(line)[1:] for line in open(log)]
  trains = [c for c in calls if c and c[0] == "scripts/train.py"]
  stages = set()
  for argv in trains:
    parsed = _train_config(ws, ["python", *argv])
    stages.add(parsed["config"]["stage"])
  assert stages >= {"vae", "clip", "text_to_image", "instruct_pix2pix"}, stages
  assert any(c[:2] == ["-m", "ip2p_jax.cli"] and "eval" in c for c in calls)


# -- the layout and the Python snippets ---------------------------------------------------

def test_the_layout_names_files_that_exist():
  (layout,) = [t for lang, t in blocks() if not lang and t.startswith("ip2p_jax/\n")]
  top = None
  for line in layout.splitlines():
    m = re.match(r"^( *)(\S+)", line)
    if not m or not re.search(r"[/.]", m.group(2)) or m.group(2).startswith("("):
      continue
    name = m.group(2)
    if not m.group(1):
      top = name
      path = name
    else:
      path = os.path.join(top, name)
    assert os.path.exists(os.path.join(ROOT, path)), f"README layout: {path} does not exist"


def test_the_readme_has_the_snippets_this_tests():
  code = "\n".join(python_snippets())
  for name in ("InstructPix2PixPipeline.from_pretrained", "negative_prompt", "callback",
               "num_images_per_prompt", "prompt_embeds", "load_pipeline"):
    assert name in code


def test_readme_python_snippets_run(workspace):
  """In the working folder, where ``ip2p-model`` is the tiny model and ``photo.jpg`` a
  60x45 picture; sizes meant for a 512 px model shrink with it (``resolution=512`` -> 32,
  the 512x384 resize -> 32x24). Nothing else is changed."""
  code = "\n".join(python_snippets())
  for old, new in PY_SMALLER.items():
    assert old in code
    code = code.replace(old, new)
  # resolution=32 scales 60x45 to 32x24 (the tiny model's multiple is 4: no padding left)
  code += "\nassert len(steps) == 20 and out.images.shape == (1, 24, 32, 3)\nprint('ran')\n"
  env = {**os.environ, "IP2P_COMPILATION_CACHE": "off"}
  out = subprocess.run([sys.executable, "-c", code], cwd=workspace, env=env,
                       capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith("ran")
  edited = Image.open(workspace / "edited.png").convert("RGB")
  assert edited.size == (32, 24)  # the photo's aspect ratio
  _assert_edited(edited, workspace / "photo.jpg")
