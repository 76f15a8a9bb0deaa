"""UNet2DConditionModel parity with diffusers (PyTorch) on tiny random weights, float32.

Both directions: weights saved by diffusers and loaded by us, and weights saved by
us and loaded by diffusers. Tolerance: max abs error <= 1e-4 on the prediction.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from conftest import nchw, nhwc, perturb_params, randomize_
from ip2p_jax.checkpoints import abstract_params, load_component, save_component
from ip2p_jax.models import UNet2DConditionModel, UNetConfig

TOL = 1e-4

VARIANTS = {
    # SD1-style: conv proj_in/proj_out, one head count for all blocks, 4 input channels.
    "sd1_conv_in4": dict(
        config=dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                    out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=8, norm_num_groups=8),
        latent=(12, 20), text=(7, 32)),
    # SD2-style: linear projections, per-block heads, 2-layer transformers, 8 input
    # channels (InstructPix2Pix), odd latent sizes that need upsample_size.
    "sd2_linear_in8": dict(
        config=dict(block_out_channels=(32, 64, 64), layers_per_block=1, in_channels=8,
                    out_channels=4,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=24, attention_head_dim=(2, 4, 4),
                    transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
                    upcast_attention=True, flip_sin_to_cos=False, freq_shift=1,
                    norm_num_groups=8),
        latent=(10, 14), text=(5, 24)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  spec = VARIANTS[request.param]
  torch.manual_seed(0)
  ref = randomize_(TorchUNet(**spec["config"]).eval())
  folder = tmp_path_factory.mktemp(request.param) / "unet"
  ref.save_pretrained(folder)
  module, params = load_component(str(folder))
  rng = np.random.default_rng(1)
  h, w = spec["latent"]
  sample = rng.standard_normal((2, h, w, spec["config"]["in_channels"])).astype(np.float32)
  context = rng.standard_normal((2, *spec["text"])).astype(np.float32)
  timesteps = np.array([3, 951], np.int32)
  return dict(ref=ref, module=module, params=params, folder=folder,
              inputs=(sample, timesteps, context), apply=jax.jit(module.apply))


def torch_forward(model, sample, timesteps, context):
  with torch.no_grad():
    out = model(torch.from_numpy(nchw(sample)), torch.from_numpy(timesteps).long(),
                torch.from_numpy(context)).sample
  return nhwc(out.numpy())


def test_loaded_from_diffusers_matches(variant):
  sample, t, ctx = variant["inputs"]
  ours = variant["apply"]({"params": variant["params"]}, sample, t, ctx)
  ref = torch_forward(variant["ref"], sample, t, ctx)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)


def test_saved_by_us_loads_in_diffusers(variant, tmp_path):
  params = perturb_params(variant["params"], seed=3)
  save_component(str(tmp_path / "unet"), variant["module"], params)
  ref = TorchUNet.from_pretrained(tmp_path / "unet").eval()
  sample, t, ctx = variant["inputs"]
  ours = variant["apply"]({"params": params}, sample, t, ctx)
  np.testing.assert_allclose(np.asarray(ours), torch_forward(ref, sample, t, ctx), atol=TOL, rtol=0)


def test_config_round_trips(variant, tmp_path):
  module = variant["module"]
  save_component(str(tmp_path / "unet"), module, variant["params"])
  again, _ = load_component(str(tmp_path / "unet"))
  assert again.config == module.config


def test_scalar_timestep_broadcasts(variant):
  sample, _, ctx = variant["inputs"]
  p = {"params": variant["params"]}
  both = variant["apply"](p, sample, np.array([7, 7], np.int32), ctx)
  scalar = variant["module"].apply(p, sample, 7, ctx)
  np.testing.assert_allclose(np.asarray(scalar), np.asarray(both), atol=1e-5)  # jit vs eager rounding


def test_remat_keeps_parameters_and_outputs():
  """Rematerialisation changes memory, not the parameter tree or the function."""
  cfg = UNetConfig(**{**VARIANTS["sd1_conv_in4"]["config"], "layers_per_block": 1})
  plain, remat = UNet2DConditionModel(cfg), UNet2DConditionModel(cfg, remat=True)
  shapes = lambda m: jax.tree.map(lambda s: s.shape, abstract_params(m))
  assert shapes(plain) == shapes(remat)
  params = plain.init(jax.random.key(0), *plain.dummy_inputs())
  x = plain.dummy_inputs()
  loss = lambda m: lambda p: jnp.sum(m.apply(p, *x) ** 2)
  g1, g2 = jax.jit(jax.grad(loss(plain)))(params), jax.jit(jax.grad(loss(remat)))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    # Same math, different fusion order: equal to float32 rounding of the gradient's scale.
    assert np.max(np.abs(a - b)) <= 1e-4 * np.max(np.abs(b)) + 1e-7
