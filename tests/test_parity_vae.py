"""AutoencoderKL parity with diffusers (PyTorch) on tiny random weights, float32.

Checks the posterior mean/logvar/mode and the decoder, both load directions,
for 2- and 3-level autoencoders. Tolerance: max abs error <= 1e-4.
"""
import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE

from conftest import nchw, nhwc, perturb_params, randomize_
from ip2p_jax.checkpoints import load_component, save_component

TOL = 1e-4

VARIANTS = {
    "2_levels": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                     latent_channels=4, scaling_factor=0.3),
    "3_levels": dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4,
                     latent_channels=3),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
  cfg = VARIANTS[request.param]
  n = len(cfg["block_out_channels"])
  torch.manual_seed(0)
  ref = randomize_(TorchVAE(down_block_types=("DownEncoderBlock2D",) * n,
                            up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval())
  folder = tmp_path_factory.mktemp(request.param) / "vae"
  ref.save_pretrained(folder)
  module, params = load_component(str(folder))
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (2, 24, 32, 3)).astype(np.float32)  # non-square
  latents = rng.standard_normal((2, 24 // 2 ** (n - 1), 32 // 2 ** (n - 1),
                                 cfg["latent_channels"])).astype(np.float32)
  return dict(ref=ref, module=module, params=params, images=images, latents=latents,
              encode=jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode")),
              decode=jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode")))


def compare(v, params, ref):
  post = v["encode"](params, v["images"])
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(nchw(v["images"]))).latent_dist
    decoded = ref.decode(torch.from_numpy(nchw(v["latents"]))).sample
  np.testing.assert_allclose(np.asarray(post.mean), nhwc(dist.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(post.logvar), nhwc(dist.logvar), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(post.mode()), nhwc(dist.mode()), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(v["decode"](params, v["latents"])), nhwc(decoded),
                             atol=TOL, rtol=0)


def test_loaded_from_diffusers_matches(variant):
  compare(variant, variant["params"], variant["ref"])


def test_saved_by_us_loads_in_diffusers(variant, tmp_path):
  params = perturb_params(variant["params"], seed=4)
  save_component(str(tmp_path / "vae"), variant["module"], params)
  ref = TorchVAE.from_pretrained(tmp_path / "vae").eval()
  assert ref.config.scaling_factor == variant["module"].config.scaling_factor
  compare(variant, params, ref)


def test_posterior_sample_has_posterior_statistics(variant):
  post = variant["encode"](variant["params"], variant["images"])
  keys = jax.random.split(jax.random.key(0), 512)
  samples = np.stack([np.asarray(post.sample(k)) for k in keys[:256]])
  z = (samples - np.asarray(post.mean)) / np.asarray(post.std)
  # Standardised samples: mean 0 (se 1/16) and variance 1 per element, pooled.
  assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.02
  assert not np.allclose(np.asarray(post.sample(keys[0])), np.asarray(post.sample(keys[1])))
