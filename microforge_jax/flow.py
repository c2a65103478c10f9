"""Rectified-flow maths as plain functions: time sampling and shift, targets, weights, ODE steps, CFG.

    z_t = (1 - t) z_0 + t eps        (t = 0: data, t = 1: noise)
    v*  = eps - z_0                  (the velocity points from data to noise)
    L   = E[w(t) ||v_theta(z_t, t, c) - v*||^2],   w(t) = 1 / (1 + |2t - 1|)   (the seed's)
          (optionally a per-position weight that depends on the condition c only, which keeps
          the minimiser E[v* | z_t, c]: see `flow_loss`)
    z_{t - dt} = z_t - dt * v        (Euler toward the data; the seed's "+" is a sign slip)
    v_hat = v_uncond + s (v_cond - v_uncond)                                   (CFG)

Two second-order ODE steps (the sampler loop around them is `sampling.make_sampler`):

* Heun (trapezoidal; Karras et al. 2022, diffusers' FlowMatchHeunDiscreteScheduler): an Euler
  predictor, the velocity again at the predicted point, then the mean of both velocities.
* DPM-Solver++(2M) (Lu et al. 2022) in data-prediction form, with alpha = 1 - t, sigma = t,
  lambda = log(alpha / sigma) and x0 = z_t - t v: one evaluation per step, the previous step's x0
  extrapolated linearly in lambda. Its first-order step is exactly Euler's.

Everything here is computed in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """The resolution shift `s t / (1 + (s - 1) t)`: s > 1 spends more time near the noise."""
    t = jnp.asarray(t, jnp.float32)
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_time(
    rng: jax.Array,
    batch: int,
    *,
    kind: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
) -> jax.Array:
    """Training times in (0, 1): uniform or logit-normal (sigmoid of N(mean, std)), then shifted."""
    if kind == "uniform":
        t = jax.random.uniform(rng, (batch,), jnp.float32)
    elif kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
    else:
        raise ValueError(f"unknown time sampling {kind!r}; use 'uniform' or 'logit_normal'")
    return shift_time(t, shift)


def _bcast(t_B: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.asarray(t_B, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def interpolate(z0: jax.Array, eps: jax.Array, t_B: jax.Array) -> jax.Array:
    """z_t = (1 - t) z_0 + t eps."""
    t = _bcast(t_B, z0)
    return (1.0 - t) * z0.astype(jnp.float32) + t * eps.astype(jnp.float32)


def velocity_target(z0: jax.Array, eps: jax.Array) -> jax.Array:
    """v* = eps - z_0."""
    return eps.astype(jnp.float32) - z0.astype(jnp.float32)


def loss_weight(t_B: jax.Array) -> jax.Array:
    """The seed's w(t) = 1 / (1 + |2t - 1|): 1 at t = 1/2, 1/2 at t = 0 and t = 1."""
    t = jnp.asarray(t_B, jnp.float32)
    return 1.0 / (1.0 + jnp.abs(2.0 * t - 1.0))


def flow_loss(
    v_pred: jax.Array, v_target: jax.Array, t_B: jax.Array, weight_Bxhxw: jax.Array | None = None
) -> jax.Array:
    """Mean over the batch of w(t) times the per-example mean squared error (fp32).

    With `weight_Bxhxw` (non-negative, per latent position) each example's error is the weighted
    mean `sum(weight * err) / sum(weight)` over positions (and the mean over channels).
    """
    err = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
    if weight_Bxhxw is None:
        per_example = err.reshape(err.shape[0], -1).mean(-1)
    else:
        w = jnp.asarray(weight_Bxhxw, jnp.float32)
        per_example = (err.mean(-1) * w).sum((1, 2)) / jnp.maximum(w.sum((1, 2)), 1e-12)
    return jnp.mean(loss_weight(t_B) * per_example)


def time_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
    """The sampler's times, from 1 (noise) down to 0 (data): (num_steps + 1,), shifted."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return shift_time(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def euler_step(z: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """One Euler step of dz/dt = v from t down to t_next: z - (t - t_next) v."""
    dt = _bcast(jnp.asarray(t, jnp.float32) - jnp.asarray(t_next, jnp.float32), z)
    return z.astype(jnp.float32) - dt * v.astype(jnp.float32)


def guidance(v_cond: jax.Array, v_uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance: v_uncond + s (v_cond - v_uncond)."""
    return v_uncond + scale * (v_cond - v_uncond)


def heun_step(z: jax.Array, v: jax.Array, v_next: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """The corrector of a Heun step from t down to t_next: z - (t - t_next) (v + v_next) / 2.

    `v` is the velocity at (z, t), `v_next` the velocity at the Euler predictor
    `euler_step(z, v, t, t_next)` at time t_next. A step to t_next = 0 should stay the predictor (as
    Karras et al. do): the model is not evaluated at pure data.
    """
    dt = _bcast(jnp.asarray(t, jnp.float32) - jnp.asarray(t_next, jnp.float32), z)
    return z.astype(jnp.float32) - dt * (0.5 * (v.astype(jnp.float32) + v_next.astype(jnp.float32)))


def dpm_solver_2m_coefficients(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-step coefficients of DPM-Solver++(2M) on a time grid, computed on the host in float64.

    With h_k = lambda(t_{k+1}) - lambda(t_k) and r_k = h_{k-1} / h_k, the step from t_k is
        z_{k+1} = ratio_k z_k + (1 - ratio_k) x0_k + slope_k (x0_k - x0_{k-1}),
        ratio_k = t_{k+1} / t_k,   slope_k = (1 - ratio_k) / (2 r_k)
    (for rectified flow sigma_{k+1} / sigma_k = ratio_k and -alpha_{k+1} (exp(-h_k) - 1) = 1 - ratio_k).
    The first step and the last (to t = 0, where lambda is infinite) are first order: slope 0.
    A grid starting at t = 1 (lambda = -inf) also gives step 1 slope 0: the linear-in-lambda
    extrapolation through a point at infinite distance is flat.

    Args:
      ts: the times (S + 1,), decreasing, with ts[k] > 0 for k < S.

    Returns:
      (ratio (S,), slope (S,)), float64.
    """
    t = np.asarray(ts, np.float64)
    if t.ndim != 1 or t.size < 2 or np.any(t[:-1] <= 0) or np.any(np.diff(t) >= 0):
        raise ValueError(f"the time grid must decrease from t > 0, got {t.tolist()}")
    ratio = t[1:] / t[:-1]
    with np.errstate(divide="ignore"):
        lam = np.log1p(-t) - np.log(t)  # -inf at t = 1, +inf at t = 0
    slope = np.zeros_like(ratio)
    for k in range(1, len(ratio) - 1):  # t_{k+1} > 0 here, so h_k is finite
        slope[k] = 0.5 * (1.0 - ratio[k]) * (lam[k + 1] - lam[k]) / (lam[k] - lam[k - 1])
    return ratio, slope


def dpm_solver_2m_step(
    z: jax.Array, x0: jax.Array, x0_prev: jax.Array, ratio: jax.Array, slope: jax.Array
) -> jax.Array:
    """One DPM-Solver++(2M) step: ratio z + (1 - ratio) x0 + slope (x0 - x0_prev).

    `x0 = z - t v` is the data estimate at this step, `x0_prev` the previous step's, and `ratio`,
    `slope` this step's entries of `dpm_solver_2m_coefficients` (scalars).
    """
    ratio = jnp.asarray(ratio, jnp.float32)
    slope = jnp.asarray(slope, jnp.float32)
    x0 = x0.astype(jnp.float32)
    return ratio * z.astype(jnp.float32) + (1.0 - ratio) * x0 + slope * (x0 - x0_prev.astype(jnp.float32))
