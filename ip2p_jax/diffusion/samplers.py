"""Samplers with one interface, each a ``jax.lax.scan`` over steps.

    x0 = sampler(denoiser, x, levels, keys)

``denoiser(x, sigma, t) -> denoised x0`` (k-diffusion's convention, Karras et al.
2022); ``x`` is the VE state ``x0 + sigma * eps``, batch first; ``levels`` is a
:class:`~ip2p_jax.diffusion.schedules.NoiseLevels`; ``keys`` holds one PRNG key
per image, and the noise added at step ``i`` to image ``b`` is drawn from
``fold_in(keys[b], i)``, so an image's result never depends on its batch.

``on_step(i, t, latents)``, if given, is called inside the loop after step ``i`` with
the state in diffusers' convention for that scheduler (the VE sample for the Euler
family, LMS and Heun; the VP latent for the others); it must be traceable (e.g. a
``jax.debug.callback``). :func:`for_config` binds a sampler to a scheduler config.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ip2p_jax.diffusion.schedules import NoiseLevels, ScheduleConfig

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def to_d(x, sigma, denoised):
  """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
  return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
  """Split a step from ``sigma_from`` to ``sigma_to`` into a deterministic step down
  to ``sigma_down`` and fresh noise of size ``sigma_up`` (k-diffusion)."""
  sigma_up = jnp.minimum(sigma_to, eta * jnp.sqrt(
      sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
  sigma_down = jnp.sqrt(sigma_to ** 2 - sigma_up ** 2)
  return sigma_down, sigma_up


def step_noise(keys: jax.Array, step: jax.Array, like: jax.Array) -> jax.Array:
  """Unit Gaussian noise for one step: image b's from ``fold_in(keys[b], step)``."""
  draw = lambda k: jax.random.normal(jax.random.fold_in(k, step), like.shape[1:], like.dtype)
  return jax.vmap(draw)(keys)


def _levels(levels: NoiseLevels):
  return (jnp.arange(levels.num_steps), jnp.asarray(levels.sigmas[:-1]),
          jnp.asarray(levels.sigmas_next), jnp.asarray(levels.sigmas[1:]),
          jnp.asarray(levels.timesteps))


def _report(on_step, i, t, latents):
  if on_step is not None:
    on_step(i, t, latents)


def _vp(x, sigma):
  """The variance-preserving latent of VE state ``x`` at level ``sigma``."""
  return x / jnp.sqrt(1 + sigma ** 2)


def _clip(denoised, clip_sample):
  return denoised if clip_sample is None else jnp.clip(denoised, -clip_sample, clip_sample)


def euler(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None,
          on_step=None) -> jax.Array:
  """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with
  no churn); diffusers' ``EulerDiscreteScheduler``."""
  def step(x, s):
    i, sigma, sigma_next, _, t = s
    d = to_d(x, sigma, denoiser(x, sigma, t))
    x = x + d * (sigma_next - sigma)
    _report(on_step, i, t, x)
    return x, None
  return jax.lax.scan(step, x, _levels(levels))[0]


def euler_ancestral(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys: jax.Array,
                    s_noise: float = 1.0, on_step=None) -> jax.Array:
  """Ancestral Euler (k-diffusion ``sample_euler_ancestral``; InstructPix2Pix's
  sampler): an Euler step to ``sigma_down``, then fresh noise ``sigma_up``.
  ``s_noise`` scales the fresh noise (0 gives a deterministic variant)."""
  def step(x, s):
    i, sigma, sigma_next, _, t = s
    denoised = denoiser(x, sigma, t)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
    x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
    x = x + step_noise(keys, i, x) * (s_noise * sigma_up)
    _report(on_step, i, t, x)
    return x, None
  return jax.lax.scan(step, x, _levels(levels))[0]


def heun(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None,
         clip_sample: float | None = None, on_step=None) -> jax.Array:
  """Heun's second-order method (Karras et al. 2022, Alg. 1 with no churn); diffusers'
  ``HeunDiscreteScheduler``: an Euler predictor to the next level, a trapezoidal
  corrector with the slope there, except for the last step to sigma = 0 (Euler only).
  Two network calls per step but the last (2S - 1 in all)."""
  def step(x, s):
    i, sigma, sigma_next, _, t, t_next = s
    d = to_d(x, sigma, _clip(denoiser(x, sigma, t), clip_sample))
    predicted = x + d * (sigma_next - sigma)
    d_next = to_d(predicted, sigma_next, _clip(denoiser(predicted, sigma_next, t_next),
                                                clip_sample))
    x = x + (d + d_next) / 2 * (sigma_next - sigma)
    _report(on_step, i, t, x)
    return x, None

  i, sigma, sigma_next, following, t = _levels(levels)
  last = levels.num_steps - 1
  x = jax.lax.scan(step, x, (i[:last], sigma[:last], sigma_next[:last], following[:last],
                             t[:last], t[1:]))[0]
  d = to_d(x, sigma[last], _clip(denoiser(x, sigma[last], t[last]), clip_sample))
  x = x + d * (sigma_next[last] - sigma[last])
  _report(on_step, i[last], t[last], x)
  return x


def lms_coefficients(sigmas: np.ndarray, order: int = 4) -> np.ndarray:
  """[S, order]: the weight of the derivative from step ``i - j`` in step ``i`` of the
  linear multistep method: the integral over [sigma_i, sigma_{i+1}] of the Lagrange
  basis polynomial through the last ``min(i + 1, order)`` levels (exact, float64)."""
  s = np.asarray(sigmas, np.float64)
  out = np.zeros((len(s) - 1, order))
  for i in range(len(s) - 1):
    nodes = [s[i - k] for k in range(min(i + 1, order))]
    for j, node in enumerate(nodes):
      others = [n for k, n in enumerate(nodes) if k != j]
      basis = (np.polynomial.Polynomial.fromroots(others) if others else
               np.polynomial.Polynomial([1.0])) / np.prod([node - n for n in others])
      antiderivative = basis.integ()
      out[i, j] = antiderivative(s[i + 1]) - antiderivative(s[i])
  return out


def lms(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None, order: int = 4,
        on_step=None) -> jax.Array:
  """Linear multistep (Adams-Bashforth in sigma, up to ``order`` past derivatives);
  diffusers' ``LMSDiscreteScheduler`` (k-diffusion ``sample_lms``)."""
  coeffs = jnp.asarray(lms_coefficients(levels.sigmas, order), jnp.float32)

  def step(carry, s):
    x, history = carry  # derivatives, the newest first
    i, sigma, _, _, t, c = s
    d = to_d(x, sigma, denoiser(x, sigma, t))
    history = jnp.concatenate([d[None], history[:-1]])
    x = x + jnp.tensordot(c.astype(x.dtype), history, axes=1)
    _report(on_step, i, t, x)
    return (x, history), None

  init = (x, jnp.zeros((order,) + x.shape, x.dtype))
  return jax.lax.scan(step, init, _levels(levels) + (coeffs,))[0][0]


def ddim(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys: jax.Array | None = None,
         eta: float = 0.0, clip_sample: float | None = None, on_step=None) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12) in VE form: ``x_next = x0 + sqrt(s'^2 - s_up^2) eps
  + s_up z`` with ``s_up = eta * std_t / sqrt(alphabar_next)``. ``clip_sample`` clips
  the predicted x0 (not the epsilon), as diffusers' ``DDIMScheduler`` does."""
  def step(x, s):
    i, sigma, sigma_next, sigma_following, t = s
    denoised = denoiser(x, sigma, t)
    eps = to_d(x, sigma, denoised)
    denoised = _clip(denoised, clip_sample)
    a_t, a_next = 1 / (1 + sigma ** 2), 1 / (1 + sigma_next ** 2)
    std = eta * jnp.sqrt((1 - a_next) / (1 - a_t) * (1 - a_t / a_next))
    sigma_up = std / jnp.sqrt(a_next)
    x = denoised + jnp.sqrt(jnp.maximum(sigma_next ** 2 - sigma_up ** 2, 0.0)) * eps
    if keys is not None and eta > 0:
      x = x + sigma_up * step_noise(keys, i, x)
    _report(on_step, i, t, _vp(x, sigma_next))
    # diffusers keeps the VP latent x / sqrt(1 + s'^2) and treats it as the latent at the
    # next step's level s'' (they differ for "linspace"/"trailing"): the VE state there
    # is that VP latent times sqrt(1 + s''^2).
    return x * jnp.sqrt((1 + sigma_following ** 2) / (1 + sigma_next ** 2)), None
  return jax.lax.scan(step, x, _levels(levels))[0]


# Adams-Bashforth weights of the newest-first outputs, by order (PLMS, Liu et al. 2022).
_ADAMS_BASHFORTH = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _pndm_table(num_calls: int, prk_calls: int = 0) -> np.ndarray:
  """Per model call, diffusers' ``PNDMScheduler`` bookkeeping as numbers (columns of
  ``_PNDM_COLUMNS``): the weights of [this output, the last 3 kept outputs (newest first),
  the Runge-Kutta accumulator] in the update; how the accumulator carries over and takes
  this output; whether the step starts from the stored sample instead of the current one,
  whether the current sample is stored, whether this output is kept.

  Runge-Kutta calls (the first ``prk_calls``, 4 per step): each steps from the step's start
  with its own output but the 4th, which uses (k1 + 2 k2 + 2 k3 + k4) / 6; k1 is kept.
  PLMS: call 1 without a warm-up averages with call 0 and restarts from call 0's sample
  (not kept); any other call is Adams-Bashforth over the kept outputs, of order
  min(kept + 1, 4)."""
  table = np.zeros((num_calls, len(_PNDM_COLUMNS)))
  col = {name: i for i, name in enumerate(_PNDM_COLUMNS)}
  kept = 0
  for c in range(num_calls):
    row = table[c]
    row[col["acc_keep"]] = 1.0
    if c < prk_calls:
      phase = c % 4
      if phase == 0:
        row[col["w_out"]], row[col["acc_keep"]], row[col["acc_add"]] = 1.0, 0.0, 1 / 6
        row[col["store"]] = row[col["keep"]] = 1
      elif phase in (1, 2):
        row[col["w_out"]], row[col["acc_add"]], row[col["from_stored"]] = 1.0, 1 / 3, 1
      else:
        row[col["w_out"]], row[col["w_acc"]], row[col["acc_keep"]] = 1 / 6, 1.0, 0.0
        row[col["from_stored"]] = 1
    elif c == 1 and prk_calls == 0:
      row[col["w_out"]] = row[col["w_h0"]] = 0.5
      row[col["from_stored"]] = 1
    else:
      ab = _ADAMS_BASHFORTH[min(kept + 1, 4)]
      row[col["w_out"]:col["w_out"] + len(ab)] = ab
      row[col["keep"]] = 1
      row[col["store"]] = c == 0
    kept += int(row[col["keep"]])
  return table


_PNDM_COLUMNS = ("w_out", "w_h0", "w_h1", "w_h2", "w_acc", "acc_keep", "acc_add",
                 "from_stored", "store", "keep")


def pndm(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None,
         prediction_type: str = "epsilon", on_step=None) -> jax.Array:
  """Pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
  Models"), diffusers' ``PNDMScheduler``: PLMS (``skip_prk_steps``, S + 1 network calls),
  or with the Runge-Kutta warm-up first (12 calls for the first 3 steps, then S - 3); see
  ``schedules._pndm_levels``. Each call is the DDIM update (the paper's eq. 9) with a
  linear combination of the network's outputs. diffusers combines raw outputs (v for
  v-prediction, converted to epsilon with the step's start), so this does too."""
  table = _pndm_table(len(levels.plms_timesteps), levels.prk_calls)
  steps = (jnp.arange(len(table)), jnp.asarray(levels.plms_timesteps),
           jnp.asarray(levels.plms_sigmas), jnp.asarray(table, jnp.float32))

  def step(carry, s):
    # VP latent, the stored sample, kept outputs (newest first), Runge-Kutta accumulator
    z, stored, history, acc = carry
    k, t, (sigma, sigma_from, sigma_to), row = s
    w_out, w_h, w_acc, acc_keep, acc_add, from_stored, store, keep = (
        row[0], row[1:4], row[4], row[5], row[6], row[7] > 0, row[8] > 0, row[9] > 0)
    x_ve = z * jnp.sqrt(1 + sigma ** 2)
    denoised = denoiser(x_ve, sigma, t)
    eps = to_d(x_ve, sigma, denoised)
    raw = eps if prediction_type == "epsilon" else _vp(eps - sigma * denoised, sigma)
    combined = (w_out * raw + jnp.tensordot(w_h.astype(z.dtype), history, axes=1)
                + w_acc * acc)
    stored = jnp.where(store, z, stored)
    source = jnp.where(from_stored, stored, z)
    if prediction_type == "v_prediction":  # v -> epsilon at the step's start
      combined = _vp(combined + sigma_from * source, sigma_from)
    # The DDIM step from level sigma_from to sigma_to, in VP latents.
    z_next = _vp(source * jnp.sqrt(1 + sigma_from ** 2) + (sigma_to - sigma_from) * combined,
                 sigma_to)
    history = jnp.where(keep, jnp.concatenate([raw[None], history[:-1]]), history)
    acc = acc_keep * acc + acc_add * raw
    _report(on_step, k, t, z_next)
    return (z_next, stored, history, acc), None

  z = _vp(x, levels.sigmas[0])
  init = (z, z, jnp.zeros((3,) + x.shape, x.dtype), jnp.zeros_like(z))
  z = jax.lax.scan(step, init, steps)[0][0]
  return z * jnp.sqrt(1 + levels.sigmas[-1] ** 2)


def ddpm(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys: jax.Array,
         clip_sample: float | None = None, variance_type: str = "fixed_small",
         on_step=None) -> jax.Array:
  """Ancestral sampling of Ho et al. 2020 (eqs. 6-7); diffusers' ``DDPMScheduler``:
  the posterior q(x_{t'} | x_t, x0) mean with the predicted x0, plus noise of variance
  beta~ (``fixed_small``) or beta (``fixed_large``), none at t = 0."""
  s = np.asarray(levels.sigmas, np.float64)
  ac = 1 / (1 + s ** 2)
  a_t, a_prev = ac[:-1], ac[1:]
  alpha, beta = a_t / a_prev, 1 - a_t / a_prev
  c_x0 = np.sqrt(a_prev) * beta / (1 - a_t)
  c_z = np.sqrt(alpha) * (1 - a_prev) / (1 - a_t)
  var = beta if variance_type == "fixed_large" else np.maximum((1 - a_prev) / (1 - a_t) * beta,
                                                               1e-20)
  std = np.where(np.asarray(levels.timesteps) > 0, np.sqrt(var), 0.0)
  coeffs = tuple(jnp.asarray(c, jnp.float32) for c in (c_x0, c_z, std))

  def step(x, s):
    i, sigma, sigma_next, _, t, c_x0, c_z, std = s
    denoised = _clip(denoiser(x, sigma, t), clip_sample)
    z = c_x0 * denoised + c_z * _vp(x, sigma) + std * step_noise(keys, i, x)
    _report(on_step, i, t, z)
    return z * jnp.sqrt(1 + sigma_next ** 2), None
  return jax.lax.scan(step, x, _levels(levels) + coeffs)[0]


def dpmpp_2m(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None, sde: bool = False,
             on_step=None) -> jax.Array:
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep second order in
  log-sigma; first order at the first step and, per ``levels.final_first_order``,
  at the last (diffusers' ``lower_order_final``/``final_sigmas_type="zero"``).
  ``sde``: DPM-Solver++(2M) SDE (diffusers' ``algorithm_type="sde-dpmsolver++"``), in VE
  form ``x' = r^2 x + (1 - r^2) D + sigma' sqrt(1 - r^2) z`` with ``r = sigma' / sigma``."""
  last = levels.num_steps - 1
  lam = lambda s: -jnp.log(s)

  def step(carry, s):
    x, old_denoised, old_sigma = carry
    i, sigma, sigma_next, _, t = s
    denoised = denoiser(x, sigma, t)
    # exp(-h) with h = lambda_next - lambda = log(sigma / sigma_next); 0 when sigma_next = 0.
    ratio = sigma_next / sigma
    first = jnp.logical_or(i == 0, jnp.logical_and(i == last, levels.final_first_order))
    h = lam(sigma_next) - lam(sigma)
    h_last = lam(sigma) - lam(old_sigma)
    r = h_last / h
    second = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    d = jnp.where(first, denoised, second)
    if sde:
      x = (ratio ** 2 * x + (1 - ratio ** 2) * d
           + sigma_next * jnp.sqrt(1 - ratio ** 2) * step_noise(keys, i, x))
    else:
      x = ratio * x + (1 - ratio) * d
    _report(on_step, i, t, _vp(x, sigma_next))
    return (x, denoised, sigma), None

  init = (x, jnp.zeros_like(x), jnp.asarray(levels.sigmas[0]))
  return jax.lax.scan(step, init, _levels(levels))[0][0]


def dpmpp_2m_sde(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys: jax.Array,
                 on_step=None) -> jax.Array:
  """DPM-Solver++(2M) SDE; see :func:`dpmpp_2m`."""
  return dpmpp_2m(denoiser, x, levels, keys, sde=True, on_step=on_step)


def unipc_tables(sigmas: np.ndarray, order: int = 2, lower_order_final: bool = True,
                 solver_type: str = "bh2", disable_corrector=()) -> dict[str, np.ndarray]:
  """The coefficients of UniPC (Zhao et al. 2023) with x0 outputs ``m``, per step i, in
  VP latents ``z``, computed once from the levels (float64):

  * corrector (UniC, from step 1, with the order of step i - 1):
    ``z_i <- keep_i z_i + c_i z_{i-1} + sum_j q_ij m_{i-j}``, j = 0..order;
  * predictor (UniP): ``z_{i+1} = a_i z_i + sum_j p_ij m_{i-j}``, j = 0..order-1.

  ``bh1``/``bh2`` are the paper's B(h) = h and e^h - 1; orders 2 use rho = 1/2 (UniP-2)
  and the first-order corrector rho = 1/2, as diffusers' ``UniPCMultistepScheduler``."""
  s = np.asarray(sigmas, np.float64)
  steps = len(s) - 1
  alpha = 1 / np.sqrt(1 + s ** 2)
  with np.errstate(divide="ignore"):
    lam = -np.log(s)  # log(alpha / sigma_vp)

  def update(target, base, n):
    """Coefficients on (z_base, m_base, m_{base-1}, ...) of the order-n UniP/UniC update
    from level ``base`` to ``target``, and the weights of the (n - 1) differences."""
    h = lam[target] - lam[base]
    hh = -h
    rks = [(lam[base - k] - lam[base]) / h for k in range(1, n)] + [1.0]
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    factorial, rows, b = 1, [], []
    for k in range(1, n + 1):
      rows.append(np.power(rks, k - 1))
      b.append(h_phi_k * factorial / b_h)
      factorial *= k + 1
      h_phi_k = h_phi_k / hh - 1 / factorial
    return (alpha[target] * s[target] / (alpha[base] * s[base]) if s[base] else 0.0,
            -alpha[target] * h_phi_1, -alpha[target] * b_h, np.array(rows), np.array(b), rks)

  orders = []
  for i in range(steps):
    n = min(order, steps - i) if lower_order_final else order
    orders.append(min(n, min(i, order) + 1))
  keep, c, q = np.ones(steps), np.zeros(steps), np.zeros((steps, order + 1))
  a, p = np.zeros(steps), np.zeros((steps, order))
  for i in range(steps):
    n = orders[i]
    a[i], m0, bh, rows, b, rks = update(i + 1, i, n)
    p[i, 0] = m0
    if n > 1:
      rhos = np.array([0.5]) if n == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
      for k in range(1, n):
        w = bh * rhos[k - 1] / rks[k - 1]
        p[i, k] += w
        p[i, 0] -= w
    if i > 0 and (i - 1) not in disable_corrector:
      n = orders[i - 1]
      ratio, m0, bh, rows, b, rks = update(i, i - 1, n)
      rhos = np.array([0.5]) if n == 1 else np.linalg.solve(rows, b)
      keep[i], c[i] = 0.0, ratio
      q[i, 1] = m0  # m_{i-1}
      for k in range(1, n):
        w = bh * rhos[k - 1] / rks[k - 1]
        q[i, 1 + k] += w
        q[i, 1] -= w
      q[i, 0] += bh * rhos[-1]
      q[i, 1] -= bh * rhos[-1]
  return dict(keep=keep, c=c, q=q, a=a, p=p)


def unipc(denoiser: Denoiser, x: jax.Array, levels: NoiseLevels, keys=None, order: int = 2,
          lower_order_final: bool = True, solver_type: str = "bh2", disable_corrector=(),
          on_step=None) -> jax.Array:
  """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework"), diffusers'
  ``UniPCMultistepScheduler`` with x0 prediction: each step corrects the current latent
  with the new output (UniC, no extra network call), then predicts the next (UniP).
  Coefficients from :func:`unipc_tables`."""
  tables = unipc_tables(levels.sigmas, order, lower_order_final, solver_type, disable_corrector)
  coeffs = tuple(jnp.asarray(tables[k], jnp.float32) for k in ("keep", "c", "q", "a", "p"))

  def step(carry, s):
    z, last, history = carry  # history: m_{i-1}, ..., m_{i-order}
    i, sigma, _, _, t, keep, c, q, a, p = s
    m = denoiser(z * jnp.sqrt(1 + sigma ** 2), sigma, t)
    outputs = jnp.concatenate([m[None], history])  # m_i, m_{i-1}, ...
    z = keep * z + c * last + jnp.tensordot(q.astype(z.dtype), outputs, axes=1)
    z_next = a * z + jnp.tensordot(p.astype(z.dtype), outputs[:order], axes=1)
    _report(on_step, i, t, z_next)
    return (z_next, z, outputs[:order]), None

  z = _vp(x, levels.sigmas[0])
  init = (z, z, jnp.zeros((order,) + x.shape, x.dtype))
  z = jax.lax.scan(step, init, _levels(levels) + coeffs)[0][0]
  return z * jnp.sqrt(1 + levels.sigmas[-1] ** 2)


SAMPLER_FNS = {
    "euler_ancestral": euler_ancestral,
    "euler": euler,
    "heun": heun,
    "lms": lms,
    "ddim": ddim,
    "pndm": pndm,
    "ddpm": ddpm,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
}


def for_config(name: str, config: ScheduleConfig, eta: float = 0.0) -> Callable:
  """``SAMPLER_FNS[name]`` with the options ``config`` (a diffusers scheduler config) sets:
  call it as ``sampler(denoiser, x, levels, keys, on_step=None)``."""
  clip = config.clip_sample_range if config.clip_sample else None
  options = {
      "ddim": dict(eta=eta, clip_sample=clip),
      "heun": dict(clip_sample=clip),
      "ddpm": dict(clip_sample=clip, variance_type=config.variance_type),
      "pndm": dict(prediction_type=config.prediction_type),
      "unipc": dict(order=config.solver_order, lower_order_final=config.lower_order_final,
                    solver_type=config.solver_type,
                    disable_corrector=tuple(config.disable_corrector)),
  }.get(name, {})
  return functools.partial(SAMPLER_FNS[name], **options)
