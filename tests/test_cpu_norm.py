"""kernels.cpu_norm: the C++ group/layer normalisation (and the SiLU fused after it)
equals float64 arithmetic forward and in all three gradients over group sizes, pixel
counts (one, fewer and more than a summing block) and parameter sets; it batches under
vmap; layers.GroupNorm and layers.LayerNorm call it exactly where ``takes`` says and equal
flax's nn.GroupNorm (then nn.silu) and nn.LayerNorm (use_fast_variance=False) with it and
without it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.kernels import build, cpu_norm
from ip2p_jax.models import layers

TOL = 1e-5  # float32 sums of up to ~10^4 terms, relative to each output's largest entry


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
  assert build.load(), "the kernels must build on the test machine (g++ is there)"


def reference(x, scale, bias, groups, eps, dy, silu=False):
  """float64 group norm of ``x [B, P, C]`` (then SiLU) and its gradients for ``dy``."""
  def norm(x, scale, bias):
    b, p, c = x.shape
    xg = x.reshape(b, p, groups, c // groups)
    mean = xg.mean((1, 3), keepdims=True)
    var = ((xg - mean) ** 2).mean((1, 3), keepdims=True)
    y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(b, p, c) * scale + bias
    return y / (1 + jnp.exp(-y)) if silu else y
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, scale, bias)]
    y, vjp = jax.vjp(norm, *args)
    return np.asarray(y), [np.asarray(g) for g in vjp(jnp.asarray(np.asarray(dy), jnp.float64))]


def close(got, want):
  want = np.asarray(want)
  scale = float(np.max(np.abs(want))) or 1.0
  np.testing.assert_allclose(np.asarray(got, np.float64) / scale, want / scale, atol=TOL, rtol=0)


def operands(b, p, c, seed=0, offset=3.0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, p, c)) * 2 + offset, jnp.float32)  # mean far from 0
  scale, bias = (jnp.asarray(rng.standard_normal(c), jnp.float32) for _ in range(2))
  dy = jnp.asarray(rng.standard_normal((b, p, c)), jnp.float32)
  return x, scale, bias, dy


# (samples, pixels, channels, groups, silu): UNet/VAE group norms (32 groups of 1-8
# channels) with and without the SiLU after them, layer norms (one pixel, one group; the
# layer-norm path), groups of 3 odd channels, fewer and more pixels than a summing block
# (64), channels that are not whole vectors (SiLU's scalar tail), one sample.
CASES = [
    (2, 50, 64, 32, False),
    (2, 50, 64, 32, True),
    (3, 1, 40, 1, False),
    (300, 1, 64, 1, False),
    (4, 7, 24, 3, False),
    (4, 7, 24, 3, True),
    (1, 256, 128, 32, True),
    (2, 130, 32, 32, False),
    (1, 1, 8, 2, False),
    (5, 3, 16, 1, False),
    (2, 5, 36, 4, True),
]


@pytest.mark.parametrize("b,p,c,groups,silu", CASES)
def test_values_and_gradients_equal_float64(b, p, c, groups, silu):
  x, scale, bias, dy = operands(b, p, c)
  eps = 1e-6
  fn = jax.jit(lambda x, s, bb: cpu_norm.normalize(x, s, bb, groups, eps, silu))
  y, vjp = jax.vjp(fn, x, scale, bias)
  want, want_grads = reference(x, scale, bias, groups, eps, dy, silu)
  close(y, want)
  for got, expected in zip(vjp(dy), want_grads):
    close(got, expected)


def test_vmap_over_samples_and_over_parameter_sets():
  """Batch editing maps a model over images (one set of parameters); an ensemble maps
  the parameters too. Values and gradients equal a loop over the mapped axis."""
  x, scale, bias, dy = operands(2, 20, 32, seed=1)
  xs, dys = jnp.stack([x, -x, 2 * x + 1]), jnp.stack([dy, dy, -dy])
  scales, biases = jnp.stack([scale, 2 * scale, -scale]), jnp.stack([bias, -bias, bias])
  fn = lambda x, s, b: cpu_norm.normalize(x, s, b, 8, 1e-5, silu=True)
  for in_axes, ss, bs in (((0, None, None), scale, bias), ((0, 0, 0), scales, biases)):
    pick = (lambda a, i: a) if in_axes[1] is None else (lambda a, i: a[i])
    out, vjp = jax.vjp(jax.vmap(fn, in_axes=in_axes), xs, ss, bs)
    dx, dscale, dbias = vjp(dys)
    wants = [jax.vjp(fn, xs[i], pick(ss, i), pick(bs, i)) for i in range(3)]
    grads = [w[1](dys[i]) for i, w in enumerate(wants)]
    for i in range(3):
      close(out[i], wants[i][0])
      close(dx[i], grads[i][0])
    stack = (lambda gs: sum(gs)) if in_axes[1] is None else jnp.stack
    close(dscale, stack([g[1] for g in grads]))
    close(dbias, stack([g[2] for g in grads]))


def test_vmapped_layer_norm_over_samples_and_parameter_sets():
  """The layer-norm path (one pixel, one group) under vmap over images (the parameters
  broadcast to one set per image) and over an ensemble of parameters: values and all
  three gradients equal a loop."""
  x, scale, bias, dy = operands(40, 1, 48, seed=2)
  xs, dys = jnp.stack([x, 0.5 * x - 1, -x]), jnp.stack([dy, -dy, 2 * dy])
  scales, biases = jnp.stack([scale, -scale, 3 * scale]), jnp.stack([bias, bias, -bias])
  fn = lambda x, s, b: cpu_norm.normalize(x, s, b, 1, 1e-5)
  for in_axes, ss, bs in (((0, None, None), scale, bias), ((0, 0, 0), scales, biases)):
    pick = (lambda a, i: a) if in_axes[1] is None else (lambda a, i: a[i])
    out, vjp = jax.vjp(jax.vmap(fn, in_axes=in_axes), xs, ss, bs)
    dx, dscale, dbias = vjp(dys)
    for i in range(3):
      want, want_grads = reference(xs[i], pick(ss, i), pick(bs, i), 1, 1e-5, dys[i])
      close(out[i], want)
      close(dx[i], want_grads[0])
      if in_axes[1] is not None:
        close(dscale[i], want_grads[1])
        close(dbias[i], want_grads[2])
    if in_axes[1] is None:
      close(dscale, sum(reference(xs[i], scale, bias, 1, 1e-5, dys[i])[1][1] for i in range(3)))
      close(dbias, sum(reference(xs[i], scale, bias, 1, 1e-5, dys[i])[1][2] for i in range(3)))


def test_bad_groups_are_refused():
  x, scale, bias, _ = operands(1, 4, 12)
  with pytest.raises(ValueError, match="multiple of groups"):
    cpu_norm.normalize(x, scale, bias, 5, 1e-5)
  with pytest.raises(ValueError, match="float32"):
    cpu_norm.normalize(x.astype(jnp.bfloat16), scale, bias, 4, 1e-5)


def _calls_kernel(module, params, x):
  forward = jax.jit(module.apply).lower(params, x).as_text()
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2))).lower(params, x)
  return cpu_norm.FORWARD in forward, cpu_norm.BACKWARD in grad.as_text()


class SiluAfter(nn.Module):
  """flax's GroupNorm then SiLU: what ``layers.group_norm(silu=True)`` is."""
  groups: int

  @nn.compact
  def __call__(self, x):
    return nn.silu(nn.GroupNorm(self.groups, epsilon=1e-6, name="norm")(x))


@pytest.mark.parametrize("shape,groups,silu,uses_kernel", [
    ((2, 16, 16, 256), 32, False, True),   # a UNet attention block's group norm
    ((2, 16, 16, 256), 32, True, True),    # a resnet block's norm and SiLU
    ((4, 64, 64, 32), 32, True, True),     # a VAE's first level
    ((2, 4, 4, 64), 32, True, False),      # below MIN_ELEMENTS: XLA's
    ((2, 512, 128), None, False, True),    # a transformer block's layer norm
    ((2, 77, 64), None, False, False),     # a small text encoder's: XLA's
])
def test_layers_use_the_kernel_where_it_takes_and_match_flax(shape, groups, silu, uses_kernel,
                                                              monkeypatch):
  x = jnp.asarray(np.random.default_rng(3).standard_normal(shape) * 1.5 + 0.5, jnp.float32)
  if groups and silu:
    ours, theirs = layers.group_norm(groups, 1e-6, silu=True), SiluAfter(groups)
  elif groups:
    ours, theirs = layers.group_norm(groups, 1e-6), nn.GroupNorm(groups, epsilon=1e-6)
  else:
    ours, theirs = layers.layer_norm(1e-5), nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)
  params = nn.unbox(ours.init(jax.random.PRNGKey(0), x))
  their_params = theirs.init(jax.random.PRNGKey(0), x)
  if silu:  # the same parameters under the wrapper's submodule name
    params_theirs = lambda p: {"params": {"norm": p["params"]}}
  else:
    params_theirs = lambda p: p
  assert jax.tree.map(jnp.shape, params_theirs(params)) == jax.tree.map(jnp.shape, their_params)
  params = jax.tree.map(lambda p: p + 0.25, params)  # not the identity affine
  assert _calls_kernel(ours, params, x) == (uses_kernel, uses_kernel)
  loss = lambda m, wrap: (lambda p, x: jnp.sum(m.apply(wrap(p), x) * jnp.cos(x)))
  want = theirs.apply(params_theirs(params), x)
  want_grads = jax.grad(loss(theirs, params_theirs), (0, 1))(params, x)
  for kernels_on in (True, False):  # both of our paths equal flax's
    if not kernels_on:
      monkeypatch.setattr(cpu_norm, "takes", lambda *a: False)
    close(ours.apply(params, x), want)
    for got, expected in zip(jax.tree.leaves(jax.grad(loss(ours, lambda p: p), (0, 1))(params, x)),
                             jax.tree.leaves(want_grads)):
      close(got, expected)
