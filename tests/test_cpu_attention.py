"""kernels.cpu_attention: the C++ FlashAttention equals softmax attention forward and
backward (float32, 1e-5) over lengths that do and do not fill its blocks, under vmap,
jit and a sharded batch; dot_product_attention picks it on CPU only where it applies.
kernels.build: a build is cached and atomic; without a compiler, or turned off,
everything still runs on XLA's kernels."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ip2p_jax.kernels import build, cpu_attention
from ip2p_jax.models import layers

TOL = 1e-5  # float32, absolute, on outputs and gradients of order 1


def reference(q, k, v):
  """softmax(q k^T / sqrt(d)) v, materialised, ``[batch, length, heads, dim]``."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v, precision="highest")


def operands(b, lq, lk, h, d, seed=0, spread=1.0):
  rng = np.random.default_rng(seed)
  q, g = (jnp.asarray(rng.standard_normal((b, lq, h, d)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((b, lk, h, d)), jnp.float32) for _ in range(2))
  return q * spread, k, v, g


@pytest.fixture(scope="module", autouse=True)
def kernel():
  assert build.load(), "the kernels must build on the test machine (g++ is there)"


# (batch, query length, key length, heads, head_dim): the kernel works in blocks of 64
# queries against 256 keys (128 transposed on AVX-512, 64 in the backward), keys packed in
# panels of 16 (64 on AVX-512), over register tiles 8-64 floats wide (cpu_common.h's
# Tile). Cases: the small UNets' self and cross attention (77 keys: a partial panel),
# lengths off every block (300 queries = 4 x 64 + 44; 295, 513 and 260 keys: a partial
# key block after full ones), fewer rows than a register tile, head_dims 8-160 (whole
# tiles, tiles plus a 16- or 8-float remainder), one head.
CASES = [
    (2, 256, 256, 8, 8),
    (2, 256, 77, 8, 8),
    (2, 300, 295, 4, 16),
    (1, 300, 513, 2, 40),
    (3, 77, 77, 1, 24),
    (1, 5, 9, 2, 40),
    (1, 70, 33, 2, 64),
    (1, 65, 260, 1, 80),
    (1, 33, 47, 1, 160),
    (1, 1, 1, 1, 8),
]


@pytest.mark.parametrize("b,lq,lk,h,d", CASES)
def test_forward_and_gradients_equal_softmax_attention(b, lq, lk, h, d):
  q, k, v, g = operands(b, lq, lk, h, d)
  out, vjp = jax.vjp(jax.jit(cpu_attention.flash_attention), q, k, v)
  want, want_vjp = jax.vjp(reference, q, k, v)
  np.testing.assert_allclose(out, want, atol=TOL, rtol=0)
  for got, expected in zip(vjp(g), want_vjp(g)):
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_scores_whose_row_maximum_moves_between_key_blocks():
  """The online softmax rescales what it summed when a later key block holds a larger
  score: keys whose scores rise by ~20 along the sequence, so that each 256-key block
  outweighs the ones before it. Against float64 (the float32 reference itself is off by
  ~|S| 2^-23 where scores are large)."""
  q, k, v, g = operands(1, 64, 700, 2, 16, seed=3)
  u = jnp.full((16,), 0.25)  # a unit vector shared by queries and keys
  q, k = q + 3 * u, k + jnp.linspace(0, 30, 700)[None, :, None, None] * u
  s = np.einsum("bqhd,bkhd->bhqk", *(np.float64(x) for x in (q, k))) / 4
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), np.float64(v))
  assert np.mean(s[..., 512:].max(-1) > s[..., :256].max(-1) + 5) > 0.9  # the maximum moves
  np.testing.assert_allclose(cpu_attention.flash_attention(q, k, v), want, atol=TOL, rtol=0)
  got = jax.vjp(cpu_attention.flash_attention, q, k, v)[1](g)
  expected = jax.vjp(reference, q, k, v)[1](g)
  for a, b in zip(got, expected):
    np.testing.assert_allclose(a, b, atol=TOL * 10, rtol=0)


def test_vmap_joins_the_batch_at_any_axis():
  """Batch editing vmaps the UNet over images: a mapped axis, leading or not, gives
  what a loop over its elements gives, values and gradients."""
  q, k, v, g = operands(3, 40, 24, 2, 8, seed=1)
  stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
  cotangent = jnp.stack([g, -g])
  loss = lambda q, k, v: jnp.sum(jax.vmap(cpu_attention.flash_attention)(q, k, v) * cotangent)
  want_loss = lambda q, k, v: sum(jnp.sum(reference(q[i], k[i], v[i]) * cotangent[i])
                                  for i in range(2))
  np.testing.assert_allclose(loss(*stacked), want_loss(*stacked), rtol=1e-5)
  for got, expected in zip(jax.grad(loss, (0, 1, 2))(*stacked),
                           jax.grad(want_loss, (0, 1, 2))(*stacked)):
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
  inner = jax.vmap(cpu_attention.flash_attention, in_axes=2, out_axes=2)
  moved = [jnp.moveaxis(x, 0, 2) for x in stacked]
  np.testing.assert_allclose(
      inner(*moved), jnp.moveaxis(jnp.stack([reference(*(x[i] for x in stacked))
                                             for i in range(2)]), 0, 2), atol=TOL)


def test_default_on_cpu_is_the_kernel_where_it_applies():
  """None picks the C++ kernel for float32 with head_dim a multiple of 8; XLA's blocked
  kernel for other head_dims and dtypes; XLA's one-shot softmax with a mask."""
  def calls_kernel(q, k, v, **kw):
    text = str(jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, **kw))
               .lower(q, k, v).as_text())
    return cpu_attention.FORWARD in text
  q, k, v, _ = operands(1, 16, 16, 2, 8)
  assert calls_kernel(q, k, v)
  q12, k12, v12, _ = operands(1, 16, 16, 2, 12)
  assert not calls_kernel(q12, k12, v12)
  np.testing.assert_allclose(layers.dot_product_attention(q12, k12, v12),
                             reference(q12, k12, v12), atol=TOL)
  half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  assert not calls_kernel(*half)
  assert not calls_kernel(q, k, v, is_causal=True)
  with pytest.raises(ValueError, match="masks"):
    layers.dot_product_attention(q, k, v, is_causal=True, implementation="cpu_flash")
  with pytest.raises(ValueError, match="head_dim a multiple of 8"):
    cpu_attention.flash_attention(q12, k12, v12)


def test_operands_that_do_not_agree_are_refused_and_empty_ones_work():
  """takes() sends a broadcast batch or a missing batch axis elsewhere; called on them
  anyway, the Python wrapper and the C++ kernel say what is wrong (the kernel reads by
  the query's shape, so it must not run on a smaller key). An empty batch gives empty
  outputs and gradients."""
  q = jnp.ones((2, 5, 2, 8))
  small = jnp.ones((1, 7, 2, 8))
  assert not cpu_attention.takes(q, small, small)
  assert not cpu_attention.takes(q, small[0], small[0])
  with pytest.raises(ValueError, match="same leading axes"):
    cpu_attention.flash_attention(q, small, small)
  with pytest.raises(Exception, match="must agree in their other axes"):
    jax.block_until_ready(cpu_attention._attention(q, small, small))
  empty_q, empty_k = jnp.ones((0, 5, 2, 8)), jnp.ones((0, 7, 2, 8))
  assert not cpu_attention.takes(empty_q, empty_k, empty_k)
  out, vjp = jax.vjp(cpu_attention._attention, empty_q, empty_k, empty_k)
  assert out.shape == (0, 5, 2, 8)
  assert [g.shape for g in vjp(out)] == [(0, 5, 2, 8), (0, 7, 2, 8), (0, 7, 2, 8)]


def test_build_is_cached_and_atomic(tmp_path):
  """A build lands under its hashed name and nothing else is left in the folder; a
  second build returns the same file without compiling (its mtime is unchanged)."""
  path = build.build(str(tmp_path))
  assert os.listdir(tmp_path) == [os.path.basename(path)]
  assert path == build.library_path(str(tmp_path))
  mtime = os.stat(path).st_mtime_ns
  assert build.build(str(tmp_path)) == path and os.stat(path).st_mtime_ns == mtime


SCRIPT = textwrap.dedent("""
    import logging, os
    import jax, jax.numpy as jnp, numpy as np
    logging.basicConfig(level=logging.WARNING)
    from ip2p_jax.kernels import cpu_attention
    from ip2p_jax.models import layers
    q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 2, 8)), jnp.float32)
    text = jax.jit(layers.dot_product_attention).lower(q, q, q).as_text()
    want = jax.nn.dot_product_attention(q, q, q)
    grad = jax.grad(lambda q: jnp.sum(layers.dot_product_attention(q, q, q) * q))(q)
    want_grad = jax.grad(lambda q: jnp.sum(jax.nn.dot_product_attention(q, q, q) * q))(q)
    print("KERNEL", cpu_attention.FORWARD in text)
    print("ERR", float(jnp.max(jnp.abs(layers.dot_product_attention(q, q, q) - want))),
          float(jnp.max(jnp.abs(grad - want_grad))))
    """)


@pytest.mark.parametrize("env,reason", [
    ({"IP2P_KERNELS": "off"}, None),
    ({"CXX": "/bin/false"}, "failed"),
    ({"CXX": "", "PATH": "/nonexistent"}, "no C++ compiler"),
])
def test_without_the_kernel_attention_runs_on_xla(tmp_path, env, reason):
  """Turned off, or where it cannot be built (a failing compiler, none at all), attention
  still gives softmax attention's values and gradients on XLA's kernel, and a failure
  says why once in the log."""
  run_env = dict(os.environ, IP2P_KERNELS=str(tmp_path / "kernels"))
  run_env.update(env)
  if run_env.get("CXX") == "":
    del run_env["CXX"]
  done = subprocess.run([sys.executable, "-c", SCRIPT], env=run_env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "KERNEL False" in done.stdout
  errors = [float(x) for x in done.stdout.split("ERR")[1].split()]
  assert max(errors) < TOL, errors
  if reason:
    assert done.stderr.count("CPU kernels are not available") == 1, done.stderr
    assert reason in done.stderr
  else:
    assert "not available" not in done.stderr


def test_sharded_batch_gives_the_unsharded_values():
  """Under jit on 4 CPU devices with the batch sharded (XLA gathers the operands for the
  kernel's call), values and gradients equal the single-device ones."""
  script = textwrap.dedent("""
      import os
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from ip2p_jax.models import layers
      rng = np.random.default_rng(0)
      q = jnp.asarray(rng.standard_normal((4, 50, 2, 16)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((4, 77, 2, 16)), jnp.float32)
      loss = lambda q, k: jnp.sum(layers.dot_product_attention(q, k, k) ** 2)
      mesh = Mesh(np.array(jax.devices()), ("data",))
      shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))
      got = jax.jit(jax.value_and_grad(loss, (0, 1)))(shard(q), shard(k))
      want = jax.value_and_grad(loss, (0, 1))(q, k)
      print("ERR", max(float(jnp.max(jnp.abs(a - b)) / (1 + float(jnp.max(jnp.abs(b)))))
                      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))))
      """)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr
  assert float(done.stdout.split("ERR")[1]) < 1e-6
