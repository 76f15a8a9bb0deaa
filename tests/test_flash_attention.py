"""layers.flash_attention: forward and gradients equal plain softmax attention; the
backward never holds the probability matrix; dot_product_attention's choice of kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.models import layers

TOL = 1e-5  # float32, absolute, on outputs and gradients of order 1


def reference(q, k, v):
  """softmax(q k^T / sqrt(d)) v, materialised, ``[batch, length, heads, dim]``."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision="highest")


def operands(b, lq, lk, h, d, seed=0):
  rng = np.random.default_rng(seed)
  q, g = (jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, lk, h, d)), jnp.float32) for _ in range(2))
  return q, k, v, g


# (batch, query length, key length, heads, head_dim, forward and backward tiles):
# self and cross attention at the default tiles; 128-query tiles, the last padded
# (300 = 2 x 128 + 44), of one head or of several heads; fewer queries than a tile.
ONE_HEAD, MANY_HEADS = (8, 1), (8, 2 ** 24)
CASES = [
    (2, 256, 256, 8, 8, layers.FLASH_FORWARD_TILES, layers.FLASH_BACKWARD_TILES),
    (2, 256, 77, 8, 8, layers.FLASH_FORWARD_TILES, layers.FLASH_BACKWARD_TILES),
    (2, 300, 295, 4, 8, ONE_HEAD, ONE_HEAD),
    (2, 300, 77, 4, 16, MANY_HEADS, ONE_HEAD),
    (3, 77, 77, 1, 32, ONE_HEAD, MANY_HEADS),
    (1, 5, 9, 2, 40, layers.FLASH_FORWARD_TILES, layers.FLASH_BACKWARD_TILES),
]


@pytest.mark.parametrize("b,lq,lk,h,d,forward_tiles,backward_tiles", CASES)
def test_forward_and_gradients_equal_softmax_attention(b, lq, lk, h, d, forward_tiles,
                                                        backward_tiles):
  q, k, v, g = operands(b, lq, lk, h, d)
  flash = lambda q, k, v: layers.flash_attention(q, k, v, forward_tiles=forward_tiles,
                                                 backward_tiles=backward_tiles)
  out, vjp = jax.vjp(flash, q, k, v)
  want, want_vjp = jax.vjp(reference, q, k, v)
  np.testing.assert_allclose(out, want, atol=TOL, rtol=0)
  for got, expected in zip(vjp(g), want_vjp(g)):
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_tiles():
  """Queries per tile: lk / key_fraction, at least 128, at most 16 MiB of scores, at most
  lq; heads per tile: the largest divisor of the head count within the byte budget."""
  assert layers.flash_tiles(24, 4096, 4096, 2, 2 ** 21) == (1024, 1)  # 16 MiB cap
  assert layers.flash_tiles(24, 1024, 1024, 2, 2 ** 21) == (512, 1)
  assert layers.flash_tiles(64, 256, 256, 8, 2 ** 17) == (128, 1)
  assert layers.flash_tiles(64, 256, 77, 8, 2 ** 21) == (128, 32)   # 32 x 128 x 308 B
  assert layers.flash_tiles(6, 5, 9, 2, 2 ** 21) == (5, 6)


def test_backward_never_holds_the_probability_matrix():
  """Forward and backward of 2 x 4096 x 4096 float32 probabilities (128 MiB), in tiles of
  one head and 1024 (forward) or 512 (backward) queries: XLA's temporaries (a few
  tiles of 8-16 MiB) stay well under the matrix."""
  b, l, h, d = 1, 4096, 2, 16
  q, k, v, g = operands(b, l, l, h, d)
  loss = lambda q, k, v: jnp.sum(layers.flash_attention(q, k, v) * g)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  probabilities = b * h * l * l * 4
  assert compiled.memory_analysis().temp_size_in_bytes < probabilities / 2


def _primitives(fn, *args) -> set:
  names = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def test_cpu_default_is_flash_and_masks_go_to_xla():
  q, k, v, _ = operands(1, 16, 16, 2, 8)
  assert "custom_vjp_call" in _primitives(layers.dot_product_attention, q, k, v)
  masked = lambda q, k, v: layers.dot_product_attention(q, k, v, is_causal=True)
  assert "custom_vjp_call" not in _primitives(masked, q, k, v)
  causal = jnp.tril(jnp.ones((16, 16), bool))
  np.testing.assert_allclose(
      masked(q, k, v), jax.nn.dot_product_attention(q, k, v, mask=causal), atol=TOL)


def test_cudnn_is_not_chosen_off_gpu():
  q = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
  assert not layers.cudnn_takes(q, q, q)


def test_a_cudnn_refusal_falls_back_to_xla(monkeypatch):
  """On a GPU the kernel is chosen before cuDNN sees the call. jax 0.11.2's cuDNN path
  checks shapes in its differentiation rule (an H200 refused the training step's
  cross-attention, 1024 queries against 77 keys), which under remat or scan runs only
  after the call returns: the chosen path must fall back to XLA with the same values
  and gradients there too, and an explicit "cudnn" must still raise."""
  real = jax.nn.dot_product_attention

  @jax.custom_vjp
  def refused_when_differentiated(q, k, v):  # like cuDNN: the primal passes
    return real(q, k, v, implementation="xla")

  def forward(q, k, v):
    raise NotImplementedError("Unsupported sequence length Q 16, KV 7.")

  refused_when_differentiated.defvjp(forward, lambda res, g: (g, g, g))
  chosen = []

  def picky(q, k, v, *, implementation=None, **kwargs):
    chosen.append(implementation)
    if implementation == "cudnn":
      return refused_when_differentiated(q, k, v)
    return real(q, k, v, implementation=implementation, **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", picky)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(layers, "cudnn_takes", lambda *a, **k: True)
  q, _, _, _ = operands(2, 16, 16, 2, 8)
  _, k, v, _ = operands(2, 7, 7, 2, 8)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  grad = lambda f: jax.value_and_grad(f, argnums=(0, 1, 2))
  want = grad(loss(lambda *a: real(*a, implementation="xla")))(q, k, v)

  def scanned(q, k, v):  # the attention inside a scan body, as the samplers run it
    return jax.lax.scan(lambda c, _: (layers.dot_product_attention(q, k, v), None),
                        jnp.zeros_like(q), None, length=2)[0]

  for name, f in (("plain", layers.dot_product_attention),
                  ("remat", jax.checkpoint(layers.dot_product_attention)),
                  ("scan", scanned)):
    chosen.clear()
    ours = grad(loss(f))(q, k, v)
    assert "xla" in chosen, name  # cuDNN was refused and XLA ran
    np.testing.assert_allclose(ours[0], want[0], atol=TOL, err_msg=name)
    for a, b in zip(ours[1], want[1]):
      np.testing.assert_allclose(a, b, atol=TOL, err_msg=name)
  with pytest.raises(NotImplementedError):
    jax.grad(loss(lambda *a: layers.dot_product_attention(*a, implementation="cudnn")))(q, k, v)
