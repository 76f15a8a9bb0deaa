"""The data engine's images: the attention hook costs the UNet nothing by default;
Prompt-to-Prompt pairs share noise and, for the first p of the steps, self-attention
maps; and the whole engine (captions -> instructions -> pairs -> CLIP filter) writes a
folder that ``ip2p data import`` and the training input pipeline read, resumably.
Tiny random models throughout (diffusers/transformers folders made by the fixtures)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.data import shapes
from ip2p_jax.metrics import scene_match
from ip2p_jax.synth import prompt_to_prompt as p2p_lib
from ip2p_jax.synth.instructions import parse_shapes_caption

STEPS = 4
# TINY_UNET's self-attentions per network call: down block 0 (1 layer), the mid block,
# up block 1 (layers_per_block + 1 = 2 layers): 4.
SELF_ATTENTIONS = 4


# -- the hook ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_unet():
  from configs import models as presets
  from ip2p_jax.models import UNet2DConditionModel, UNetConfig
  unet = UNet2DConditionModel(UNetConfig.from_dict(presets.TINY_UNET))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  t = jnp.array([500, 500])
  ctx = jax.random.normal(jax.random.key(1), (2, 7, 32))
  params = jax.jit(unet.init)(jax.random.key(2), x, t, ctx)["params"]
  return unet, params, (x, t, ctx)


def _jaxpr_and_output(unet, params, inputs, interceptor=None):
  fn = lambda p, *a: unet.apply({"params": p}, *a)
  if interceptor is None:
    return str(jax.make_jaxpr(fn)(params, *inputs)), np.asarray(fn(params, *inputs))
  with nn.intercept_methods(interceptor):
    return str(jax.make_jaxpr(fn)(params, *inputs)), np.asarray(fn(params, *inputs))


def test_default_unet_path_pays_nothing_for_the_hook(tiny_unet):
  unet, params, inputs = tiny_unet
  default, out = _jaxpr_and_output(unet, params, inputs)
  passthrough, out_p = _jaxpr_and_output(unet, params, inputs, lambda f, a, k, c: f(*a, **k))
  assert passthrough == default  # the hook point adds no operation
  np.testing.assert_array_equal(out_p, out)
  # The Prompt-to-Prompt interceptor does change the program, and only the second image:
  # batch (x_0, x_1) is one pair.
  hooked, out_h = _jaxpr_and_output(unet, params, inputs,
                                    p2p_lib.inject_self_attention(jnp.array([True])))
  assert hooked != default and hooked.count("select_n") > default.count("select_n")
  np.testing.assert_array_equal(out_h[0], out[0])
  assert np.abs(out_h[1] - out[1]).max() > 1e-3
  _, out_off = _jaxpr_and_output(unet, params, inputs,
                                 p2p_lib.inject_self_attention(jnp.array([False])))
  np.testing.assert_array_equal(out_off, out)


def test_injected_steps_is_the_first_p_fraction():
  np.testing.assert_array_equal(p2p_lib.injected_steps([0.0, 0.1, 0.25, 0.26, 0.9, 1.0], 4),
                                [0, 1, 1, 2, 4, 4])
  seeds, p, scale = p2p_lib.draw(0, 3, 1000)
  assert 0.1 <= p.min() and p.max() <= 0.9 and 7.5 <= scale.min() and scale.max() <= 15
  np.testing.assert_array_equal(p2p_lib.draw(0, 3, 1000)[0], seeds)  # deterministic
  assert not np.array_equal(p2p_lib.draw(0, 4, 1000)[0], seeds)


# -- pairs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
  from pipeline_fixtures import save_sd
  folder = tmp_path_factory.mktemp("sd")
  save_sd(folder)
  return str(folder)


def _pipe(folder):
  from ip2p_jax.pipelines import TextToImagePipeline
  pipe = TextToImagePipeline.from_pretrained(folder, compilation_cache=False)
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.fixture(scope="module")
def pipe(sd_folder):
  return _pipe(sd_folder)


PROMPTS = ("a red cat on a chair", "a blue dog on a chair")
P = (0.0, 1.0, 0.5)
SEEDS = (3, 5, 11)
SCALES = (7.5, 12.0, 15.0)


def test_pairs_share_noise_and_p_0_is_an_independent_generation(pipe):
  p2p = p2p_lib.PromptToPrompt(pipe, num_inference_steps=STEPS)
  first, second = p2p([PROMPTS[0]] * 3, [PROMPTS[1]] * 3, SEEDS, P, SCALES, output_type="np")
  assert first.shape == second.shape == (3, 16, 16, 3)
  alone = lambda prompt, j: pipe(prompt, seed=SEEDS[j], guidance_scale=SCALES[j],
                                 num_inference_steps=STEPS, scheduler="euler_ancestral",
                                 output_type="np").images[0]
  # The first image is never changed; with p = 0 neither is the second (the batch only
  # reorders float sums: tolerance 1e-5 on [0, 1] pixels).
  for j in range(3):
    np.testing.assert_allclose(first[j], alone(PROMPTS[0], j), atol=1e-5)
  np.testing.assert_allclose(second[0], alone(PROMPTS[1], 0), atol=1e-5)
  # With p = 1 the second image is another picture (injection acts; 100x the tolerance).
  assert np.abs(second[1] - alone(PROMPTS[1], 1)).max() > 1e-3
  uint8 = p2p([PROMPTS[0]] * 3, [PROMPTS[1]] * 3, SEEDS, P, SCALES)
  np.testing.assert_array_equal(uint8[1], np.round(second * 255).astype(np.uint8))


def test_self_attention_maps_are_shared_for_the_first_p_of_the_steps(sd_folder, monkeypatch):
  """A recorder placed inside the injection sees the query and key each self-attention
  really uses and sends the largest difference between a pair's two maps to the host."""
  records = []

  def record(inject, diff):
    records.append((np.asarray(inject), np.asarray(diff)))

  def recorder(next_fun, args, kwargs, context):
    if context.method_name == "attend" and kwargs.get("self_attention"):
      q, k = args[0], args[1]
      maps = jax.nn.softmax(jnp.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1]), -1)
      maps = maps.reshape((-1, len(P), 2) + maps.shape[1:])  # (branch, pair, first/second)
      diff = jnp.abs(maps[:, :, 0] - maps[:, :, 1]).max(axis=(0, 2, 3, 4))
      jax.debug.callback(record, current_inject[0], diff)
    return next_fun(*args, **kwargs)

  current_inject = [None]
  original = p2p_lib.inject_self_attention

  def inject_and_record(inject):
    current_inject[0] = inject
    outer = original(inject)
    return lambda f, a, k, c: outer(lambda *a2, **k2: recorder(f, a2, k2, c), a, k, c)

  monkeypatch.setattr(p2p_lib, "inject_self_attention", inject_and_record)
  pipe = _pipe(sd_folder)  # its own compiled programs, traced with the recorder
  p2p = p2p_lib.PromptToPrompt(pipe, num_inference_steps=STEPS)
  p2p([PROMPTS[0]] * 3, [PROMPTS[1]] * 3, SEEDS, P, SCALES)
  jax.effects_barrier()
  assert len(records) == STEPS * SELF_ATTENTIONS
  inject = np.stack([r[0] for r in records])  # [calls, pairs]
  diff = np.stack([r[1] for r in records])
  # Injected calls: ceil(p * steps) steps of every self-attention, p = 0, 1, 0.5.
  np.testing.assert_array_equal(inject.sum(0), [0, STEPS * SELF_ATTENTIONS,
                                                STEPS // 2 * SELF_ATTENTIONS])
  assert diff[inject].max() <= 1e-6  # the same maps (both CFG branches)
  # Not injected: the two prompts' maps differ somewhere (p = 0 all along; p = 0.5 later).
  assert diff[:, 0].max() > 1e-4 and diff[~inject[:, 2], 2].max() > 1e-4


# -- the engine ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  from clip_fixtures import save_tiny_clip
  folder = tmp_path_factory.mktemp("clip")
  save_tiny_clip(folder)
  return str(folder)


CAPTIONS = [shapes.caption(shapes.random_scene(np.random.default_rng(i))) for i in range(3)] \
    + ["a photo of a cat on a chair"]
SETTINGS = ["--samples", "3", "--keep", "1", "--steps", str(STEPS), "--batch-size", "3",
            # A random CLIP's image similarities are all ~0.999 and its caption ones near
            # 0.2: every threshold passes but the direction similarity's, set to 0.25
            # where it splits this run's pairs (measured: 4 of 12 pass, 2 prompts keep none).
            "--min-sim-0", "-1", "--min-sim-1", "-1", "--min-sim-image", "-1"]


def _synth(tmp_path, sd_folder, clip_folder, *extra):
  from ip2p_jax.cli import main
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(CAPTIONS) + "\n\n")
  return main(["synth", "--captions", str(captions), "--out", str(tmp_path / "synth"),
               "--model", sd_folder, "--clip", clip_folder, *SETTINGS, *extra])


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory, sd_folder, clip_folder):
  tmp_path = tmp_path_factory.mktemp("engine")
  assert _synth(tmp_path, sd_folder, clip_folder, "--min-sim-direction", "0.25") == 0
  return tmp_path


def _lines(out):
  return {name: [json.loads(l) for l in open(os.path.join(out, name, "metadata.jsonl"))]
          for name in sorted(os.listdir(out)) if name.isdigit()}


def test_engine_writes_the_original_folder_format(synthesized):
  out = str(synthesized / "synth")
  lines = _lines(out)
  assert list(lines) == [f"{i:07d}" for i in range(len(CAPTIONS))]
  seeds_json = json.load(open(os.path.join(out, "seeds.json")))
  report = json.load(open(os.path.join(out, "synth_report.json")))
  kept_total, judged = 0, {True: 0, False: 0}
  for name, rows in lines.items():
    prompt = json.load(open(os.path.join(out, name, "prompt.json")))
    index = int(name)
    assert prompt["input"] == prompt["caption"] == CAPTIONS[index] != prompt["output"]
    assert prompt["edit"] and prompt["index"] == index
    seeds, p, scale = p2p_lib.draw(0, index, 3)  # deterministic per prompt
    assert [r["seed"] for r in rows] == list(seeds)
    np.testing.assert_allclose([r["p"] for r in rows], p)
    np.testing.assert_allclose([r["cfg_scale"] for r in rows], scale)
    # The filter: direction similarity >= 0.25, then the best 1 by direction similarity.
    passing = [r for r in rows if r["clip_sim_dir"] >= 0.25]
    best = sorted(passing, key=lambda r: -r["clip_sim_dir"])[:1]
    assert sorted(r["seed"] for r in rows if r["kept"]) == sorted(r["seed"] for r in best)
    for r in rows:
      assert ("sim_direction" in r["rejected_by"]) == (r["clip_sim_dir"] < 0.25)
      assert ("outranked" in r["rejected_by"]) == (r in passing and r not in best)
      for k in (0, 1):
        assert os.path.isfile(os.path.join(out, name, f"{r['seed']}_{k}.jpg")) == r["kept"]
    # The colour judge's verdicts on shapes-world captions (none on the generic one).
    before, after = (parse_shapes_caption(prompt["input"]), parse_shapes_caption(prompt["output"]))
    for r in rows:
      if before is None:
        assert "follows_edit" not in r
        continue
      assert r["edit"] == getattr(scene_match.infer_edit(before, after), "kind", None)
      assert r["follows_edit"] in (True, False, None) and r["depicts_input"] in (True, False, None)
      judged[r["kept"]] += r["follows_edit"] is not None
    kept = sorted(r["seed"] for r in rows if r["kept"])
    kept_total += len(kept)
    assert ([name, kept] in seeds_json) == bool(kept)
  assert report["generated"] == 3 * len(CAPTIONS) and report["kept"] == kept_total
  assert report["rejected"] == report["generated"] - kept_total
  assert report["rejected_by"]["sim_direction"] > 0 and kept_total > 0  # the split is real
  assert report["rejected_by"]["sim_0"] == report["rejected_by"]["sim_image"] == 0
  assert len(seeds_json) < len(CAPTIONS)  # a prompt with no pair kept is not listed
  assert report["colour_judge"]["kept"]["judged"] == judged[True]
  assert report["colour_judge"]["rejected"]["judged"] == judged[False]
  assert os.path.isfile(os.path.join(out, "contact_sheet.png"))


def test_a_kept_pair_is_its_recorded_settings_drawn_again(synthesized, sd_folder, clip_folder):
  """The files and scores of a kept pair are what its row says: drawn again from its
  captions, seed, p and text scale, the two pictures are the JPEGs (each encoded as the
  engine does: mean difference under half a level), differ from each other, and CLIP
  gives the row's four similarities (1e-4)."""
  import io

  from PIL import Image

  from ip2p_jax.metrics import ClipSimilarity
  from ip2p_jax.synth import engine
  from ip2p_jax.synth.engine import SynthConfig
  out = str(synthesized / "synth")
  name, row = next((n, r) for n, rows in _lines(out).items() for r in rows if r["kept"])
  prompt = json.load(open(os.path.join(out, name, "prompt.json")))
  pairs = p2p_lib.PromptToPrompt(_pipe(sd_folder), num_inference_steps=STEPS)
  first, second = pairs([prompt["input"]] * 3, [prompt["output"]] * 3, [row["seed"]] * 3,
                        [row["p"]] * 3, [row["cfg_scale"]] * 3)  # the engine's batch of 3
  for k, image in enumerate((first[0], second[0])):
    saved = np.asarray(Image.open(os.path.join(out, name, f"{row['seed']}_{k}.jpg")), np.int16)
    again = np.asarray(Image.open(io.BytesIO(engine._jpeg(image, SynthConfig().jpeg_quality))),
                       np.int16)
    assert np.abs(saved - again).mean() < 0.5, k
  # two prompts: two pictures (measured 1.3 levels apart on average, this random model)
  assert np.abs(first[0].astype(np.int16) - second[0]).mean() > 0.5
  sims = ClipSimilarity(clip_folder)(first[:1], second[:1], [prompt["input"]],
                                     [prompt["output"]])
  for key, field in (("sim_0", "clip_sim_0"), ("sim_1", "clip_sim_1"),
                     ("sim_direction", "clip_sim_dir"), ("sim_image", "clip_sim_image")):
    assert float(sims[key][0]) == pytest.approx(row[field], abs=1e-4), key


def test_import_and_the_training_input_pipeline_read_it(synthesized):
  from ip2p_jax.cli import main
  from ip2p_jax.data import builders, input_pipeline
  out = str(synthesized / "synth")
  report = json.load(open(os.path.join(out, "synth_report.json")))
  assert main(["data", "import", "--format", "ip2p-folder", out,
               "--out", str(synthesized / "dataset")]) == 0
  source = builders.open_split(builders.find_dataset(str(synthesized / "dataset")), "train")
  assert len(source) == report["kept"]
  prompts = {json.load(open(os.path.join(out, n, "prompt.json")))["edit"] for n in _lines(out)}
  assert {source[i]["instruction"].decode() for i in range(len(source))} <= prompts
  loader = input_pipeline.make_loader(source, input_pipeline.PipelineConfig(
      resolution=16, batch_size=2, num_epochs=1, shuffle=False))
  batch = next(iter(loader))
  assert batch["input_image"].shape == batch["edited_image"].shape == (2, 16, 16, 3)
  assert batch["input_ids"].shape[0] == 2


def test_resume_redoes_only_unfinished_prompts_identically(synthesized, sd_folder,
                                                           clip_folder, capsys):
  out = synthesized / "synth"
  name = "0000002"
  before = {f: (out / name / f).read_bytes() for f in os.listdir(out / name)}
  report = json.loads((out / "synth_report.json").read_text())
  # A run killed inside prompt 2: its folder without prompt.json, a partial temp file.
  (out / name / "prompt.json").unlink()
  (out / name / ".tmp-x.jpg").write_bytes(b"partial")
  stamp = {n: os.stat(out / n / "prompt.json").st_mtime_ns for n in ("0000000", "0000003")}
  assert _synth(synthesized, sd_folder, clip_folder, "--min-sim-direction", "0.25") == 0
  assert "resumed_prompts: 3" in capsys.readouterr().out
  after = {f: (out / name / f).read_bytes() for f in os.listdir(out / name)}
  assert after == before  # the same seeds, p, scales and instruction: the same files
  assert json.loads((out / "synth_report.json").read_text()) == {**report, "resumed_prompts": 3}
  assert stamp == {n: os.stat(out / n / "prompt.json").st_mtime_ns for n in stamp}
  # Other settings in the same folder are refused.
  assert _synth(synthesized, sd_folder, clip_folder, "--min-sim-direction", "0.5") == 2
  assert "other settings (filter)" in capsys.readouterr().err
