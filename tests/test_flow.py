"""Rectified-flow maths against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microforge_jax import flow


def test_interpolation_endpoints_and_target():
    z0 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 2, 4)), jnp.float32)
    eps = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 2, 4)), jnp.float32)
    np.testing.assert_allclose(flow.interpolate(z0, eps, jnp.zeros(3)), z0)
    np.testing.assert_allclose(flow.interpolate(z0, eps, jnp.ones(3)), eps)
    t = jnp.array([0.25, 0.5, 0.9])
    z_t = flow.interpolate(z0, eps, t)
    np.testing.assert_allclose(z_t[0], 0.75 * z0[0] + 0.25 * eps[0], rtol=1e-6)
    # d z_t / dt is the velocity target.
    v = flow.velocity_target(z0, eps)
    dz = jax.jvp(lambda s: flow.interpolate(z0, eps, s), (t,), (jnp.ones(3),))[1]
    np.testing.assert_allclose(dz, v, rtol=1e-6)


def test_loss_weight_is_the_seeds():
    np.testing.assert_allclose(flow.loss_weight(jnp.array([0.0, 0.25, 0.5, 1.0])), [0.5, 1 / 1.5, 1.0, 0.5])


def test_flow_loss_hand_computed():
    v_pred = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    v_true = jnp.array([[0.0, 0.0], [1.0, 1.0]])
    t = jnp.array([0.5, 1.0])
    # example 0: mse 2.5 * w 1.0; example 1: mse 1.0 * w 0.5 -> mean 1.5
    np.testing.assert_allclose(flow.flow_loss(v_pred, v_true, t), 1.5)


def test_euler_step_hand_computed_and_exact_on_straight_paths():
    z = jnp.array([[2.0, -1.0]])
    v = jnp.array([[1.0, 3.0]])
    np.testing.assert_allclose(flow.euler_step(z, v, 0.75, 0.5), [[1.75, -1.75]])
    # On a straight path with the true velocity, Euler from t=1 reaches z0 exactly.
    z0, eps = jnp.array([[0.3, -0.7]]), jnp.array([[1.1, 0.4]])
    ts = flow.time_grid(5, shift=3.0)
    z = eps
    for i in range(5):
        z = flow.euler_step(z, flow.velocity_target(z0, eps), ts[i], ts[i + 1])
    np.testing.assert_allclose(z, z0, atol=1e-6)


def test_time_grid_and_shift():
    ts = flow.time_grid(4)
    np.testing.assert_allclose(ts, [1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flow.time_grid(4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    np.testing.assert_allclose(shifted[2], 3 * 0.5 / (1 + 2 * 0.5))
    assert bool(jnp.all(jnp.diff(shifted) < 0))
    with pytest.raises(ValueError, match="at least 1"):
        flow.time_grid(0)


def test_sample_time_ranges_and_shift():
    t = flow.sample_time(jax.random.key(0), 20000, kind="uniform")
    assert 0 <= float(t.min()) and float(t.max()) <= 1 and abs(float(t.mean()) - 0.5) < 0.01
    ln = flow.sample_time(jax.random.key(1), 20000, kind="logit_normal")
    assert abs(float(jnp.median(ln)) - 0.5) < 0.02 and float(ln.std()) < float(t.std())
    shifted = flow.sample_time(jax.random.key(1), 20000, kind="logit_normal", shift=3.0)
    assert float(shifted.mean()) > float(ln.mean()) + 0.1
    with pytest.raises(ValueError, match="unknown time sampling"):
        flow.sample_time(jax.random.key(0), 4, kind="beta")


def test_guidance():
    vc, vu = jnp.array([2.0]), jnp.array([1.0])
    np.testing.assert_allclose(flow.guidance(vc, vu, 1.0), vc)
    np.testing.assert_allclose(flow.guidance(vc, vu, 0.0), vu)
    np.testing.assert_allclose(flow.guidance(vc, vu, 3.0), [4.0])


def test_weighted_flow_loss_hand_computed():
    v_pred = jnp.zeros((2, 1, 2, 1))
    v_true = jnp.array([1.0, 3.0, 2.0, 2.0]).reshape(2, 1, 2, 1)
    t = jnp.array([0.5, 0.5])
    w = jnp.array([[[1.0, 3.0]], [[2.0, 2.0]]])
    # example 0: (1 * 1 + 3 * 9) / 4 = 7; example 1: 4 -> mean 5.5
    np.testing.assert_allclose(flow.flow_loss(v_pred, v_true, t, w), 5.5)
    np.testing.assert_allclose(
        flow.flow_loss(v_pred, v_true, t, jnp.ones((2, 1, 2))), flow.flow_loss(v_pred, v_true, t)
    )


def test_cell_weight_map_follows_the_3x3_grid():
    from microforge_jax.train_steps import cell_weight_map

    cells = np.zeros((2, 9), np.float32)
    cells[0, [0, 4]] = 1  # top left and center
    cells[1, 8] = 1  # bottom right
    w = np.asarray(cell_weight_map(jnp.asarray(cells), 16, 16, 5.0))
    # Hand-computed: latent rows/cols 0-4 are grid row/col 0, 5-10 are 1, 11-15 are 2 (by centre).
    band = {0: slice(0, 5), 1: slice(5, 11), 2: slice(11, 16)}
    expected = np.ones((2, 16, 16), np.float32)
    for b, cell in ((0, 0), (0, 4), (1, 8)):
        expected[b, band[cell // 3], band[cell % 3]] = 5.0
    np.testing.assert_array_equal(w, expected)


def test_heun_step_hand_computed_on_a_linear_field():
    field = lambda z, t: 0.5 * z + 2.0 * t
    z, t, t_next = jnp.array([[2.0, -1.0]]), 0.75, 0.5
    v = field(z, t)  # [2.5, 1.0]
    z_pred = flow.euler_step(z, v, t, t_next)  # the predictor: [1.375, -1.25]
    v_next = field(z_pred, t_next)  # [1.6875, 0.375]
    # z - 0.25 * mean of the velocities: 2 - 0.25 * 2.09375, -1 - 0.25 * 0.6875
    np.testing.assert_allclose(flow.heun_step(z, v, v_next, t, t_next), [[1.4765625, -1.171875]], rtol=1e-7)
    # The trapezoid is exact for a velocity linear in t: z - (b / 2)(t^2 - t_next^2).
    v_t = lambda t: jnp.full_like(z, 2.0 * t)
    np.testing.assert_allclose(flow.heun_step(z, v_t(t), v_t(t_next), t, t_next), z - (0.75**2 - 0.25), rtol=1e-7)


def dpm_solver_2m_textbook(z, x0, x0_prev, t_prev, t, t_next):
    """DPM-Solver++(2M)'s step as diffusers writes it (midpoint form, alpha = 1 - t, sigma = t), float64."""
    lam = lambda s: np.log((1 - s) / s)
    h, h_0 = lam(t_next) - lam(t), lam(t) - lam(t_prev)
    d1 = (x0 - x0_prev) * h / h_0
    return t_next / t * z - (1 - t_next) * np.expm1(-h) * (x0 + 0.5 * d1)


def test_dpm_solver_2m_steps_hand_computed_on_a_linear_field():
    field = lambda z, t: 0.5 * z + 2.0 * t
    ts = np.array([0.75, 0.5, 0.25, 0.0])
    ratio, slope = flow.dpm_solver_2m_coefficients(ts)
    # lambda(0.75) = -log 3, lambda(0.5) = 0, lambda(0.25) = log 3: equal steps, so slope_1 = (1 - 1/2) / 2.
    np.testing.assert_allclose(ratio, [2 / 3, 0.5, 0.0], rtol=1e-15)
    np.testing.assert_allclose(slope, [0.0, 0.25, 0.0], rtol=1e-15)  # first and last steps: first order
    z = jnp.array([2.0])
    x0_prev = z - 0.75 * field(z, 0.75)  # 0.125
    z = flow.dpm_solver_2m_step(z, x0_prev, jnp.zeros(1), ratio[0], slope[0])
    np.testing.assert_allclose(z, [1.375], rtol=1e-7)  # the first-order step is Euler's: 2 - 0.25 * 2.5
    x0 = z - 0.5 * field(z, 0.5)  # 1.375 - 0.5 * 1.6875 = 0.53125
    z = flow.dpm_solver_2m_step(z, x0, x0_prev, ratio[1], slope[1])
    # 0.5 * 1.375 + 0.5 * 0.53125 + 0.25 * (0.53125 - 0.125)
    np.testing.assert_allclose(z, [1.0546875], rtol=1e-7)
    np.testing.assert_allclose(z, dpm_solver_2m_textbook(1.375, 0.53125, 0.125, 0.75, 0.5, 0.25), rtol=1e-7)
    x0_last = z - 0.25 * field(z, 0.25)
    np.testing.assert_allclose(flow.dpm_solver_2m_step(z, x0_last, x0, ratio[2], slope[2]), x0_last, rtol=1e-7)


def test_dpm_solver_2m_coefficients_match_the_textbook_step_on_a_shifted_grid():
    """On unequal lambda steps (a shifted grid from t = 1) every inner step equals diffusers' formula;
    step 1 has slope 0: lambda(1) = -inf, so the extrapolation through the first point is flat."""
    ts = np.asarray(flow.time_grid(6, shift=3.0), np.float64)
    ratio, slope = flow.dpm_solver_2m_coefficients(ts)
    assert slope[0] == slope[1] == slope[-1] == 0.0 and np.all(slope[2:-1] > 0)
    rng = np.random.default_rng(0)
    for k in range(2, 5):
        z, x0, x0_prev = rng.standard_normal((3, 5))
        got = flow.dpm_solver_2m_step(jnp.asarray(z), jnp.asarray(x0), jnp.asarray(x0_prev), ratio[k], slope[k])
        want = dpm_solver_2m_textbook(z, x0, x0_prev, ts[k - 1], ts[k], ts[k + 1])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for bad in ([1.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match="must decrease"):
            flow.dpm_solver_2m_coefficients(np.asarray(bad))
