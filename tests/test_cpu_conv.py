"""kernels.cpu_conv: the C++ 3x3 convolution equals XLA's (float32) forward and in both
gradients over image sizes, channel counts and batches; it batches under vmap (images,
and kernels); layers.Conv runs it (or only its gradients) where the plan says and
matches flax's nn.Conv, parameters included."""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.kernels import build, cpu_conv
from ip2p_jax.models import layers

# Sums of up to 9 x 64 products of order 1: float32 rounding, relative to the output.
TOL = 1e-5


def reference(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision="highest")


def close(got, want):
  scale = float(jnp.max(jnp.abs(want))) or 1.0
  np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=TOL, rtol=0)


def operands(n, h, w, cin, cout, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
  g = jnp.asarray(rng.standard_normal((n, h, w, cout)), jnp.float32)
  return x, kernel, g


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
  assert build.load(), "the kernels must build on the test machine (g++ is there)"


# (batch, height, width, in, out): square and not, one pixel, one row, one column, odd
# sizes; channels 8-192, in != out both ways (8-128 floats out: every register tile of
# the 8- and 16-float builds, 16- and 8-float remainders), more row chunks than images,
# more images than chunks, output channels split over tasks (few small images, wide);
# channels that are not multiples of 8 (3 and 20 in, 4 out: padded with zeros). The
# forward reads every image's taps in place (indirect product); the kernel gradient of
# images of at most 64 pixels takes the gathered (im2col) path, of larger ones the
# stacked one.
CASES = [
    (2, 8, 8, 8, 16),
    (1, 5, 9, 24, 8),
    (3, 1, 1, 16, 16),
    (1, 1, 7, 8, 40),
    (2, 6, 1, 40, 8),
    (1, 17, 13, 64, 64),
    (5, 4, 4, 32, 64),
    (1, 32, 32, 56, 24),
    (2, 9, 11, 192, 64),
    (1, 6, 7, 16, 96),
    (1, 3, 3, 32, 136),
    (2, 7, 6, 3, 32),
    (1, 5, 4, 20, 4),
    (3, 9, 8, 64, 256),
    (1, 9, 9, 3, 16),
]


@pytest.mark.parametrize("xla_forward", [False, True])
@pytest.mark.parametrize("n,h,w,cin,cout", CASES)
def test_forward_and_gradients_equal_xla(n, h, w, cin, cout, xla_forward):
  x, kernel, g = operands(n, h, w, cin, cout)
  conv = jax.jit(lambda x, k: cpu_conv.conv3x3(x, k, xla_forward=xla_forward))
  out, vjp = jax.vjp(conv, x, kernel)
  want, want_vjp = jax.vjp(reference, x, kernel)
  close(out, want)
  for got, expected in zip(vjp(g), want_vjp(g)):
    close(got, expected)


@pytest.mark.parametrize("h,w", [(6, 5), (9, 11)])  # kernel gradient: gathered, stacked
def test_vmap_over_images_and_over_kernels(h, w):
  """Batch editing maps the UNet over images (one kernel): the mapped axis joins the
  batch; mapping over kernels too (an ensemble) gives each image group its kernel.
  Values and gradients equal a loop over the mapped axis."""
  x, kernel, g = operands(2, h, w, 16, 8, seed=1)
  xs, gs = jnp.stack([x, -x, 2 * x]), jnp.stack([g, g, -g])
  kernels = jnp.stack([kernel, 2 * kernel, -kernel])
  for in_axes, ks in (((0, None), kernel), ((0, 0), kernels)):
    pick = (lambda i: ks) if in_axes[1] is None else (lambda i: ks[i])
    out, vjp = jax.vjp(jax.vmap(cpu_conv.conv3x3, in_axes=in_axes), xs, ks)
    dx, dk = vjp(gs)
    for i in range(3):
      want, want_vjp = jax.vjp(reference, xs[i], pick(i))
      close(out[i], want)
      close(dx[i], want_vjp(gs[i])[0])
    want_dk = [jax.vjp(reference, xs[i], pick(i))[1](gs[i])[1] for i in range(3)]
    close(dk, sum(want_dk) if in_axes[1] is None else jnp.stack(want_dk))


def _kernels_used(module, x):
  """(the forward calls the convolution kernel, the gradient calls the filter kernel)"""
  params = module.init(jax.random.PRNGKey(0), x)
  forward = jax.jit(module.apply).lower(params, x).as_text()
  loss = lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32))
  backward = jax.jit(jax.grad(loss)).lower(params, x).as_text()
  return (cpu_conv.CONV in forward, cpu_conv.FILTER in backward), params


@pytest.mark.parametrize("features,kernel_size,stride,cin,dtype,expected", [
    (32, 3, 1, 16, jnp.float32, (True, True)),
    (64, 3, 1, 64, jnp.float32, (True, True)),
    (64, 3, 1, 192, jnp.float32, (True, True)),    # many channels in, 64 out
    (128, 3, 1, 64, jnp.float32, None),            # wider: XLA's forward on AVX2 builds
    (32, 3, 2, 32, jnp.float32, (False, False)),   # stride 2 (downsampling)
    (32, 1, 1, 32, jnp.float32, (False, False)),   # 1x1
    (32, 3, 1, 3, jnp.float32, (True, True)),      # an image's 3 channels in, padded to 8
    (128, 3, 1, 4, jnp.float32, (False, True)),    # a latent's 4 in, many out: XLA forward
    (4, 3, 1, 32, jnp.float32, (False, True)),     # 4 out (conv_out): XLA's forward
    (32, 3, 1, 32, jnp.bfloat16, (False, False)),
])
def test_conv_layer_uses_the_kernels_where_they_apply_and_matches_flax(
    features, kernel_size, stride, cin, dtype, expected):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, cin)), dtype)
  ours = layers.conv(features, kernel_size, stride=stride, dtype=dtype)
  used, params = _kernels_used(ours, x)
  if expected is None:  # an 8-float build keeps XLA's forward for layers this wide
    expected = (build.vector_width() >= 16, True)
  assert used == expected
  pad = kernel_size // 2
  flax_conv = nn.Conv(features, (kernel_size,) * 2, strides=(stride,) * 2,
                      padding=((pad, pad), (pad, pad)), dtype=dtype)
  flax_params = flax_conv.init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, flax_params) == jax.tree.map(jnp.shape, nn.unbox(params))
  params = jax.tree.map(lambda p: p + 0.1, nn.unbox(params))  # a nonzero bias
  got = ours.apply(params, x).astype(jnp.float32)
  want = flax_conv.apply(params, x).astype(jnp.float32)
  if dtype == jnp.float32:
    close(got, want)
  else:
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape", [(0, 4, 4, 8), (2, 0, 4, 8), (2, 4, 0, 8)])
def test_empty_images(shape):
  """No images, or images without rows or columns: an empty output and a zero filter
  gradient, as XLA gives (the kernel is not planned for them, but runs if called)."""
  x, kernel = jnp.ones(shape), jnp.ones((3, 3, 8, 16))
  assert cpu_conv.plan(x, kernel, (1, 1), ((1, 1), (1, 1))) is None
  loss = lambda conv: (lambda x, k: jnp.sum(conv(x, k)))
  assert cpu_conv.conv3x3(x, kernel).shape == shape[:3] + (16,)
  dx, dk = jax.grad(loss(cpu_conv.conv3x3), (0, 1))(x, kernel)
  assert dx.shape == shape and not np.any(dk)


def test_plan():
  x = jnp.zeros((1, 4, 4, 16), jnp.float32)
  k = jnp.zeros((3, 3, 16, 64), jnp.float32)
  same = ((1, 1), (1, 1))
  assert cpu_conv.plan(x, k, (1, 1), same) == "kernel"
  assert cpu_conv.plan(jnp.zeros((1, 4, 4, 256)), jnp.zeros((3, 3, 256, 64)), (1, 1),
                       same) == "kernel"
  wide = "kernel" if build.vector_width() >= 16 else "gradients"
  assert cpu_conv.plan(x, jnp.zeros((3, 3, 16, 128)), (1, 1), same) == wide
  assert cpu_conv.plan(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 32)), (1, 1),
                       same) == "kernel"
  assert cpu_conv.plan(jnp.zeros((1, 4, 4, 4)), jnp.zeros((3, 3, 4, 128)), (1, 1),
                       same) == "gradients"
  assert cpu_conv.plan(x, jnp.zeros((3, 3, 16, 36)), (1, 1), same) == "gradients"
  assert cpu_conv.plan(x, k, (1, 1), "SAME") is None
  assert cpu_conv.plan(x, k, (1, 1), ((0, 0), (0, 0))) is None
  assert cpu_conv.plan(x, k, (2, 2), same) is None
  assert cpu_conv.plan(x.astype(jnp.bfloat16), k, (1, 1), same) is None
  with pytest.raises(ValueError, match="3x3 kernel"):
    cpu_conv.conv3x3(jnp.zeros((1, 4, 4, 12)), jnp.zeros((3, 3, 8, 8)))


NARROW = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from ip2p_jax.kernels import build, cpu_attention, cpu_conv
    print("WIDTH", build.vector_width())
    rng = np.random.default_rng(0)
    errors = []
    for n, h, w, cin, cout in [(1, 5, 9, 24, 8), (1, 1, 7, 8, 40), (2, 4, 5, 16, 128),
                               (2, 9, 10, 16, 24)]:
      x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin), jnp.float32)
      ref = lambda x, k: jax.lax.conv_general_dilated(
          x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision="highest")
      for f in (cpu_conv.conv3x3, ref):
        got = jax.value_and_grad(lambda x, k: jnp.sum(f(x, k) ** 2), (0, 1))(x, k)
        errors.append(got)
      (a, (da, dka)), (b, (db, dkb)) = errors[-2:]
      errors[-2:] = [max(float(jnp.max(jnp.abs(u - v)) / (1 + float(jnp.max(jnp.abs(v)))))
                         for u, v in ((a, b), (da, db), (dka, dkb)))]
    for b, lq, lk, h, d in [(1, 70, 77, 2, 40), (2, 33, 300, 1, 8), (1, 9, 5, 1, 24)]:
      q, k, v = (jnp.asarray(rng.standard_normal((b, l, h, d)), jnp.float32)
                 for l in (lq, lk, lk))
      def ref(q, k, v):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(d)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v, precision="highest")
      loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * q))
      got = jax.grad(loss(cpu_attention.flash_attention), (0, 1, 2))(q, k, v)
      want = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
      errors.append(max(float(jnp.max(jnp.abs(u - w))) for u, w in zip(got, want)))
      errors.append(float(jnp.max(jnp.abs(cpu_attention.flash_attention(q, k, v)
                                          - ref(q, k, v)))))
    print("PLAN", cpu_conv.plan(jnp.zeros((1, 4, 4, 16)), jnp.zeros((3, 3, 16, 128)), (1, 1),
                                ((1, 1), (1, 1))))
    print("ERR", max(errors))
    """)


def test_8_float_build_gives_the_same_numbers(tmp_path):
  """The kernels built for 8-float vectors (AVX2; forced here with -mno-avx512f, which
  changes nothing on a CPU without AVX-512) give the same convolutions and attention,
  values and gradients, at widths that exercise every tile and remainder; and keep
  XLA's forward for layers writing more than 64 channels."""
  env = dict(os.environ, IP2P_KERNELS=str(tmp_path / "kernels"),
             IP2P_KERNELS_CXXFLAGS="-mno-avx512f")
  done = subprocess.run([sys.executable, "-c", NARROW], env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "WIDTH 8" in done.stdout and "PLAN gradients" in done.stdout, done.stdout
  assert float(done.stdout.split("ERR")[1]) < TOL, done.stdout
