"""kernels.cpu_adamw and train.state.FusedAdamW: the fused AdamW + EMA pass gives what
optax's chain (clip_by_global_norm -> adamw(schedule)) + apply_updates + ema_update gives,
with the same optimizer state (a checkpoint of one path resumes in the other), over
steps that clip and that do not, warm-up and cosine schedules, and leaves of every size
(the vector loop's tail included); the train step uses it where ``FusedAdamW.of`` says
and falls back to optax for other parameter dtypes; bad operands are refused."""
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ip2p_jax.kernels import build, cpu_adamw
from ip2p_jax.train import state as state_lib
from ip2p_jax.train.step import make_step

# Both sides are float32 in optax's order; XLA and GCC each contract some a * b + c into
# one FMA, so elements differ by a few ulp of the values they were computed from: 2e-6
# of each leaf's largest entry (observed <= 3e-7; an element near zero after p + u can
# differ relatively more).
TOL = 2e-6


@pytest.fixture(scope="module", autouse=True)
def kernel_built():
  assert build.load(), "the kernels must build on the test machine (g++ is there)"


def config(**kw):
  c = dict(stage="instruct_pix2pix", learning_rate=1e-3, warmup_steps=2, lr_schedule="constant",
           total_steps=20, grad_clip_norm=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8,
           weight_decay=1e-2)
  c.update(kw)
  return ml_collections.ConfigDict(c)


SIZES = (1, 7, 15, 16, 17, 33, 100_003)  # below, at and past one 16-float vector


def tree_of(rng, scale=1.0):
  return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)) * scale, jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=(8,)) * scale, jnp.float32)},
          "sizes": [jnp.asarray(rng.normal(size=(n,)) * scale, jnp.float32) for n in SIZES]}


def assert_trees_close(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=TOL * float(np.abs(w).max()))


@pytest.mark.parametrize("schedule,eps,weight_decay", [
    ("constant", 1e-8, 1e-2), ("cosine", 1e-8, 1e-2),
    ("constant", 1e-3, 0.0),  # eps large enough to move every update; no weight decay
])
def test_fused_steps_equal_optax_steps(schedule, eps, weight_decay):
  c = config(lr_schedule=schedule, adam_eps=eps, weight_decay=weight_decay)
  optimizer, fused = state_lib.make_optimizer(c), state_lib.FusedAdamW.of(c)
  assert fused is not None
  rng = np.random.default_rng(0)
  params = tree_of(rng)
  ref = got = state_lib.create(params, optimizer, 0)
  reference, fused_update = jax.jit(state_lib.optax_update(optimizer)), jax.jit(fused.update)
  clipped = 0
  for i in range(6):
    # Even steps: gradients whose norm is far above the clip (clipped); odd: far below.
    grads = tree_of(rng, scale=1.0 if i % 2 == 0 else 1e-3)
    clipped += float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))) > 1.0
    decay = state_lib.ema_decay(ref.step, 0.999)
    want, out = reference(grads, ref, decay), fused_update(grads, got, decay)
    assert_trees_close(out, want)
    ref = ref.replace(step=ref.step + 1, params=want[0], opt_state=want[1], ema_params=want[2])
    got = got.replace(step=got.step + 1, params=out[0], opt_state=out[1], ema_params=out[2])
  assert clipped == 3
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), got.params, params)
  assert min(jax.tree.leaves(moved)) > 1e-5  # every leaf was updated, tail elements too
  assert int(got.opt_state[1][0].count) == int(got.opt_state[1][2].count) == 6


def test_train_step_uses_the_kernel_in_place_and_equals_optax():
  c = config()
  optimizer, fused = state_lib.make_optimizer(c), state_lib.FusedAdamW.of(c)
  schedule = state_lib.learning_rate_schedule(c)

  def loss(params, frozen, batch, rng):
    del frozen, rng
    err = sum(jnp.sum((p - batch["target"]) ** 2) for p in jax.tree.leaves(params))
    return err, {"loss": err}

  rng = np.random.default_rng(1)
  params = tree_of(rng)
  batch = {"target": jnp.float32(0.5)}
  steps = {name: jax.jit(make_step(loss, optimizer, schedule, ema_decay=0.99, fused=f),
                         donate_argnums=(0,)) for name, f in (("optax", None), ("fused", fused))}
  compiled = steps["fused"].lower(state_lib.create(params, optimizer, 0), {}, batch).compile()
  assert cpu_adamw.TARGET in compiled.as_text()
  # In place: each leaf's four results alias its parameter, moments and EMA operands,
  # and none of the moments or EMA (which only the update touches) is copied first.
  call = next(line for line in compiled.as_text().splitlines() if cpu_adamw.TARGET in line)
  aliases = re.findall(r"\{(\d+)\}: \((\d+), \{\}\)", call)
  leaves = len(jax.tree.leaves(params))
  assert sorted((int(o), int(i)) for o, i in aliases) == [
      (4 * l + j, 1 + 5 * l + k) for l in range(leaves) for j, k in enumerate((0, 2, 3, 4))]
  assert re.search(r"= f32\S* copy\(%state_(ema|opt)", compiled.as_text()) is None
  assert cpu_adamw.TARGET not in steps["optax"].lower(
      state_lib.create(params, optimizer, 0), {}, batch).as_text()
  states = {name: state_lib.create(jax.tree.map(jnp.copy, params), optimizer, 0)
            for name in steps}
  for _ in range(4):
    for name, step in steps.items():
      states[name], _ = step(states[name], {}, batch)
  assert_trees_close(states["fused"], states["optax"])
  # A checkpoint of one path is the other's state: the fused one continues optax's.
  continued, _ = steps["fused"](states["optax"], {}, batch)
  reference, _ = steps["optax"](states["fused"], {}, batch)
  assert_trees_close(continued, reference)


def test_other_parameter_dtypes_take_optax():
  c = config()
  optimizer, fused = state_lib.make_optimizer(c), state_lib.FusedAdamW.of(c)
  params = {"w": jnp.ones((16,), jnp.bfloat16)}
  loss = lambda p, f, b, r: (jnp.sum(p["w"].astype(jnp.float32) ** 2), {})
  step = jax.jit(make_step(loss, optimizer, state_lib.learning_rate_schedule(c),
                           ema_decay=0.99, fused=fused))
  state = state_lib.create(params, optimizer, 0)
  assert cpu_adamw.TARGET not in step.lower(state, {}, {}).as_text()
  new, _ = step(state, {}, {})
  assert new.params["w"].dtype == jnp.bfloat16


def test_fused_update_applies_only_to_the_plain_chain(monkeypatch):
  assert state_lib.FusedAdamW.of(config()) is not None
  assert state_lib.FusedAdamW.of(config(stage="vae", vae_train="decoder")) is None
  assert state_lib.FusedAdamW.of(config(customize=dict(method="lora", rank=4))) is None
  monkeypatch.setattr(build, "load", lambda: False)  # kernels off or not buildable
  assert state_lib.FusedAdamW.of(config()) is None


def test_other_optimizer_states_are_refused():
  c = config()
  fused = state_lib.FusedAdamW.of(c)
  params = {"w": jnp.ones((8,), jnp.float32)}
  other = optax.multi_transform({"a": optax.adam(1e-3)}, {"w": "a"})
  state = state_lib.create(params, other, 0)
  with pytest.raises(TypeError, match="clip -> adamw"):
    fused.update({"w": jnp.ones((8,), jnp.float32)}, state, jnp.float32(0.9))


def test_bad_operands_are_refused():
  one = [jnp.zeros((4,), jnp.float32)]
  kw = dict(grad_norm=1.0, bias1=0.1, bias2=0.001, learning_rate=1e-3, ema_decay=0.9, b1=0.9,
            b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0, max_norm=1.0)
  with pytest.raises(ValueError, match="one leaf per role"):
    cpu_adamw.adamw_ema(one, one, one, one, [], **kw)
  with pytest.raises(ValueError, match="leaf 0"):
    cpu_adamw.adamw_ema(one, [jnp.zeros((5,), jnp.float32)], one, one, one, **kw)
  with pytest.raises(ValueError, match="float32"):
    cpu_adamw.adamw_ema([jnp.zeros((4,), jnp.bfloat16)], one, one, one, one, **kw)
  assert cpu_adamw.adamw_ema([], [], [], [], [], **kw) == ([], [], [], [])
