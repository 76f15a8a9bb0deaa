"""The attention function's implementations agree with each other."""
import jax
import numpy as np
import pytest

from ip2p_jax.models import layers


def test_flash_attention_refuses_masks():
  q = np.zeros((1, 4, 1, 8), np.float32)
  with pytest.raises(ValueError, match="does not take masks"):
    layers.dot_product_attention(q, q, q, is_causal=True, implementation="flash")


def _score_dtypes(fn, *args) -> list:
  """The operand dtypes of every dot product in ``fn``'s program (scan bodies included)."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


@pytest.mark.parametrize("implementation", [None, "flash", "xla"])
def test_upcast_attention_computes_scores_in_float32(implementation):
  import jax.numpy as jnp
  q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal((1, 16, 2, 8)), jnp.bfloat16)
             for i in range(3))
  attend = lambda upcast: (lambda q, k, v: layers.dot_product_attention(
      q, k, v, implementation=implementation, upcast=upcast))
  plain, upcast = _score_dtypes(attend(False), q, k, v), _score_dtypes(attend(True), q, k, v)
  if implementation != "xla":  # jax.nn's XLA path is not a plain dot_general program
    assert plain[0] == ("bfloat16", "bfloat16") and upcast[0] == ("float32", "float32")
  out = attend(True)(q, k, v)
  assert out.dtype == jnp.bfloat16
  exact = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
  assert np.abs(np.asarray(out, np.float32) - np.asarray(exact)).max() < 0.05
  # The upcast is what changes the numbers: rounded to bfloat16, float32 attention is what
  # XLA's upcast path gives bit for bit (scores, softmax and value product in float32),
  # and what the flash path (value product in the value's dtype) misses less often than
  # the plain bfloat16 path does (measured: 0 and 69 of 256 entries, against 91-98).
  rounded = np.asarray(exact.astype(jnp.bfloat16), np.float32)
  missed = {u: int((np.asarray(attend(u)(q, k, v), np.float32) != rounded).sum())
            for u in (False, True)}
  if implementation == "xla":
    assert missed[True] == 0 < missed[False], missed
  else:
    assert missed[True] < missed[False], missed


def test_unet_config_upcast_attention_reaches_the_attention():
  """``upcast_attention`` in a UNet config.json changes the program: float32 scores."""
  import jax.numpy as jnp
  from ip2p_jax.models import unet
  raw = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
             cross_attention_dim=8, attention_head_dim=2, sample_size=8,
             down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
  x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 3, 8))
  counts = {}
  for upcast in (False, True):
    model = unet.UNet2DConditionModel(unet.UNetConfig.from_dict({**raw, "upcast_attention": upcast}),
                                      dtype=jnp.bfloat16, attention_implementation="flash")
    params = model.init(jax.random.key(0), x, t, ctx)
    dots = _score_dtypes(lambda p: model.apply(p, x, t, ctx), params)
    counts[upcast] = sum(d == ("float32", "float32") for d in dots)
  # 4 transformers (1 in down block 0, 1 mid, 2 in up block 1: layers_per_block + 1)
  # x 2 attentions (self, cross) x 1 score product each.
  assert counts[True] - counts[False] == 8


@pytest.mark.parametrize("shape,groups,dtype", [((2, 8, 8, 32), 8, "float32"),
                                                ((2, 5, 64), 32, "float32"),
                                                ((2, 4, 4, 16), 4, "bfloat16")])
def test_group_norm_equals_flax_group_norm(shape, groups, dtype):
  """layers.GroupNorm (per-channel then per-group sums) = nn.GroupNorm with two-pass
  variance: outputs within 1e-5 in float32 (2e-2 in bf16, the output dtype), gradients
  within 1e-4 (sums over every element of a channel)."""
  import flax.linen as nn
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, jnp.float32)
  ours = layers.group_norm(groups, 1e-6, dtype=jnp.dtype(dtype))
  flax = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False,
                      dtype=jnp.dtype(dtype))
  params = {"scale": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32),
            "bias": jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)}
  assert jax.tree.map(jnp.shape, nn.unbox(ours.init(jax.random.key(0), x))["params"]) == \
      jax.tree.map(jnp.shape, params)
  loss = lambda m: lambda p, x: jnp.sum(m.apply({"params": p}, x).astype(jnp.float32) * x)
  got, want = ours.apply({"params": params}, x), flax.apply({"params": params}, x)
  assert got.dtype == want.dtype == jnp.dtype(dtype)
  tol = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
  if dtype == "float32":
    for a, b in zip(jax.tree.leaves(jax.grad(loss(ours), argnums=(0, 1))(params, x)),
                    jax.tree.leaves(jax.grad(loss(flax), argnums=(0, 1))(params, x))):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("padding", [None, "VALID", "SAME"])
def test_1x1_conv_is_a_product_equal_to_flax_conv_both_ways(padding):
  """A 1x1 stride-1 convolution runs as one product over the channels (XLA:CPU's 1x1
  convolutions ran at a quarter of its products' speed): no convolution in the program
  either way, and values and gradients equal flax's nn.Conv within float32 rounding
  (1e-5 of the largest entry, sums over 48 channels)."""
  import flax.linen as nn
  import jax.numpy as jnp
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 7, 48)), jnp.float32)
  kw = {} if padding is None else {"padding": padding}
  ours = layers.conv(24, 1, **kw)
  params = jax.tree.map(lambda p: p + 0.1, nn.unbox(ours.init(jax.random.key(0), x)))
  theirs = nn.Conv(24, (1, 1), padding="VALID")
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  program = jax.jit(jax.grad(loss(ours), (0, 1))).lower(params, x).as_text()
  assert "convolution" not in program and "dot_general" in program
  for got, want in zip(jax.tree.leaves((ours.apply(params, x),
                                        jax.grad(loss(ours), (0, 1))(params, x))),
                       jax.tree.leaves((theirs.apply(params, x),
                                        jax.grad(loss(theirs), (0, 1))(params, x)))):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
