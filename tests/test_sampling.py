"""The sampler: scan vs a step-by-step reference, planner carry, CFG, seeds, Euler, tasks, sharding, CLI.

Every comparison runs on redrawn parameters (DESIGN §7) with fake text embeddings of width 48; no
pretrained text encoder is loaded. Compiled samplers are shared through module-scoped fixtures.
"""

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from microforge_jax import cli, flow, sampling
from microforge_jax.checkpoint import StageCheckpointer, save_run_config
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.data.shapes import make_record
from microforge_jax.models.denoiser import Text, build_denoiser, task_id
from microforge_jax.models.text import TextEmbeddings
from microforge_jax.models.vae import auto_slice_size, build_vae
from microforge_jax.pipeline import MicroForgePipeline, SampleError
from microforge_jax.sharding import make_mesh

TINY = [
    "model.backbone.depth=2",
    "model.backbone.dim=64",
    "model.backbone.head_dim=32",
    "model.planner.num_tokens=4",
    "model.planner.depth=1",
    "model.latent_channels=4",
    "model.text.embed_dim=48",
    "model.vae.channels=(8,16)",
    "train.vae.pretrained=",  # train the tiny VAE (the shipped nano weights do not fit it)
    "model.vae.downsample_factor=4",
    # A non-trivial latent normalisation, so the reference checks where it is applied.
    "model.vae.scaling_factor=0.5",
    "model.vae.shift_factor=0.2",
]
B, M, E = 2, 6, 48
H, W = 16, 24  # a 4x6 latent grid: non-square, so h/w mix-ups show
STEPS = 4
ROOT = Path(__file__).resolve().parent.parent


def fake_text(seed: int, batch: int = B, empty: bool = False) -> Text:
    """Text embeddings of width 48; `empty` imitates the empty prompt (2 real tokens)."""
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((batch, M, E)).astype(np.float32)
    mask = np.zeros((batch, M), bool)
    mask[:, : 2 if empty else M - 1] = True
    tokens[~mask] = 0
    return Text(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(tokens[:, :2].mean(1)))


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_config(load_config("nano", TINY))


@pytest.fixture(scope="module")
def params(cfg, redraw):
    """Redrawn denoiser and VAE parameters (bare trees, as load_run returns them)."""
    z = jnp.zeros((1, H // 4, W // 4, 4))
    t1 = fake_text(0, 1)
    den = build_denoiser(cfg)
    init = lambda: den.init(jax.random.key(0), z, jnp.ones(1), t1, prev_plan_BxKxD=jnp.zeros((1, 4, 64)))
    dparams = jax.jit(init)()["params"]
    vparams = jax.jit(lambda: build_vae(cfg).init(jax.random.key(1), jnp.zeros((1, H, W, 3))))()["params"]
    return {"denoiser": redraw(dparams, seed=1), "vae": redraw(vparams, seed=2)}


@pytest.fixture(scope="module")
def sampler(cfg):
    """The guided sampler, keeping the plan trajectory; compiled once for the module."""
    return sampling.make_sampler(cfg, STEPS, keep_plans=True)


@pytest.fixture(scope="module")
def source_sampler(cfg):
    return sampling.make_sampler(cfg, 2, with_source=True, keep_plans=True)


@pytest.fixture(scope="module")
def inputs():
    return fake_text(1), fake_text(2, 1, empty=True), sampling.initial_noise(0, B, (H // 4, W // 4), 4)


def reference(cfg, params, text, uncond, noise, scale, steps, *, carry=True, source=None, task="generate"):
    """The same sampling, step by step in Python: `Denoiser.plan` then `.velocity`, each CFG half
    run as its own batch with its own plan state; returns (images, latent, plans (S, 2B, K, D))."""
    den, vae = build_denoiser(cfg), build_vae(cfg)
    dv, vv = {"params": params["denoiser"]}, {"params": params["vae"]}
    plan_fn = jax.jit(lambda *a: den.apply(dv, *a, method="plan"))
    vel_fn = jax.jit(lambda *a: den.apply(dv, *a, method="velocity"))
    b = noise.shape[0]
    uncond = Text(*(jnp.broadcast_to(u, (b, *u.shape[1:])) for u in uncond))
    src = None
    if source is not None:
        src = (vae.apply(vv, source, method="encode").mode() - cfg.vae.shift_factor) * cfg.vae.scaling_factor
    task_B = jnp.full((b,), task_id(task))
    ts = np.asarray(flow.time_grid(steps), np.float64)
    z, state, traj = noise, {"c": None, "u": None}, []
    for k in range(steps):
        t_B = jnp.full((b,), ts[k], jnp.float32)
        v = {}
        for half, txt in (("c", text), ("u", uncond)):
            prev = state[half] if carry else None
            state[half] = plan_fn(z, t_B, txt, prev, None if prev is None else jnp.ones((b,), bool))
            v[half] = vel_fn(z, t_B, txt, state[half], task_B, src)
        z = z - (ts[k] - ts[k + 1]) * (v["u"] + scale * (v["c"] - v["u"]))
        traj.append(jnp.concatenate([state["c"], state["u"]]))
    images = vae.apply(vv, z / cfg.vae.scaling_factor + cfg.vae.shift_factor, method="decode")
    return jnp.clip(images, -1, 1), z, jnp.stack(traj)


@pytest.fixture(scope="module")
def guided_out(sampler, params, inputs):
    text, uncond, noise = inputs
    return sampler(params, text, uncond, noise, 3.0)


# ----------------------------------------------------------------------------- core sampler


def test_output_has_spread_and_depends_on_prompt(sampler, params, inputs, guided_out, relerr):
    text, uncond, noise = inputs
    images = np.asarray(guided_out.images_BxHxWx3)
    assert images.shape == (B, H, W, 3) and np.isfinite(images).all()
    assert images.std() > 0.05 and (np.abs(images) < 1.0).mean() > 0.5  # spread, mostly not clipped
    other = sampler(params, fake_text(7), uncond, noise, 3.0)
    assert relerr(other.images_BxHxWx3, images) > 1e-2
    assert relerr(other.latent_BxhxwxC, guided_out.latent_BxhxwxC) > 1e-2


def test_scan_equals_step_by_step_reference_with_carried_plans(cfg, params, inputs, guided_out, relerr):
    """The scan carries (z, plan) exactly as a manual plan/velocity loop does, per CFG half."""
    text, uncond, noise = inputs
    images, z, plans = reference(cfg, params, text, uncond, noise, 3.0, STEPS)
    assert relerr(guided_out.latent_BxhxwxC, z) <= 1e-5
    assert relerr(guided_out.images_BxHxWx3, images) <= 1e-5
    assert guided_out.plans_SxNxKxD.shape == (STEPS, 2 * B, 4, 64)
    for k in range(STEPS):  # step k started from the gated mix of step k-1's output and p_init
        assert relerr(guided_out.plans_SxNxKxD[k], plans[k]) <= 1e-5, k
    # Not vacuous: restarting the planner from p_init at every step gives another trajectory.
    _, z_reset, plans_reset = reference(cfg, params, text, uncond, noise, 3.0, STEPS, carry=False)
    assert relerr(plans_reset[1], plans[1]) > 1e-3
    assert relerr(z_reset, z) > 1e-4


def test_guidance_scale_one_is_the_conditional_prediction(sampler, cfg, params, inputs, guided_out, relerr):
    text, uncond, noise = inputs
    out1 = sampler(params, text, uncond, noise, 1.0)
    _, z_cond, _ = reference(cfg, params, text, uncond, noise, 1.0, STEPS)  # scale 1: v = v_cond exactly
    assert relerr(out1.latent_BxhxwxC, z_cond) <= 1e-5
    assert relerr(guided_out.latent_BxhxwxC, out1.latent_BxhxwxC) > 1e-2  # scale 3 differs
    # Without guidance (B rows only) the sampler matches scale 1 as well.
    plain = sampling.make_sampler(cfg, STEPS, guidance=False, decode=False)(params, text, None, noise, 1.0)
    assert relerr(plain.latent_BxhxwxC, out1.latent_BxhxwxC) <= 1e-5


def test_cfg_halves_keep_separate_plan_states(sampler, params, inputs, relerr):
    text, uncond, noise = inputs
    a = sampler(params, text, uncond, noise, 1.0)
    b = sampler(params, text, fake_text(9, 1, empty=True), noise, 1.0)  # another unconditional text
    cond_a, cond_b = a.plans_SxNxKxD[:, :B], b.plans_SxNxKxD[:, :B]
    unc_a, unc_b = a.plans_SxNxKxD[:, B:], b.plans_SxNxKxD[:, B:]
    assert relerr(unc_b, unc_a) > 1e-2  # the unconditional trajectory follows its own text
    assert relerr(cond_b, cond_a) <= 1e-6  # ... and never leaks into the conditional one
    assert relerr(b.images_BxHxWx3, a.images_BxHxWx3) <= 1e-5


def test_same_seed_same_images_other_seed_differs(sampler, params, inputs, guided_out):
    text, uncond, _ = inputs
    same = sampler(params, text, uncond, sampling.initial_noise(0, B, (H // 4, W // 4), 4), 3.0)
    other = sampler(params, text, uncond, sampling.initial_noise(1, B, (H // 4, W // 4), 4), 3.0)
    np.testing.assert_array_equal(np.asarray(same.images_BxHxWx3), np.asarray(guided_out.images_BxHxWx3))
    assert np.abs(np.asarray(other.images_BxHxWx3) - np.asarray(guided_out.images_BxHxWx3)).mean() > 1e-2


class LinearField(nn.Module):
    """A denoiser test double: v = a * z + b, no planner."""

    a: float
    b: float

    def __call__(self, z, t, text, **kw):
        return self.a * z + self.b, None


def test_euler_steps_on_a_known_velocity_field(cfg):
    a, b, steps, shift = 0.7, -0.3, 3, 2.0
    noise = sampling.initial_noise(3, 2, (2, 3), 4)
    text = fake_text(0)
    s = sampling.make_sampler(cfg, steps, guidance=False, decode=False, shift=shift, denoiser=LinearField(a, b))
    z = np.asarray(s({"denoiser": {}, "vae": {}}, text, None, noise, 1.0).latent_BxhxwxC, np.float64)
    ts = [shift * t / (1 + (shift - 1) * t) for t in np.linspace(1, 0, steps + 1)]
    want = np.asarray(noise, np.float64)
    for t, t_next in zip(ts[:-1], ts[1:]):
        want = want - (t - t_next) * (a * want + b)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
    # The step rule is pluggable: (z, v, t, t_next) -> z_next.
    rule = lambda z, v, t, t_next: z + t_next * v
    s = sampling.make_sampler(cfg, 2, guidance=False, decode=False, step_fn=rule, denoiser=LinearField(a, b))
    z = np.asarray(s({"denoiser": {}, "vae": {}}, text, None, noise, 1.0).latent_BxhxwxC, np.float64)
    want = np.asarray(noise, np.float64)
    for t_next in (0.5, 0.0):
        want = want + t_next * (a * want + b)
    np.testing.assert_allclose(z, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        sampling.make_sampler(cfg, 0)


class GaussianField(nn.Module):
    """A denoiser test double: the exact rectified-flow velocity of data z0 ~ N(mu, s^2) per channel,
    E[eps - z0 | z_t] = (t - (1 - t) s^2) / var_t (z_t - (1 - t) mu) - mu, var_t = (1 - t)^2 s^2 + t^2.
    Its ODE carries the noise eps at t = 1 to mu + s eps at t = 0."""

    mu: tuple[float, ...]
    s: tuple[float, ...]

    def __call__(self, z, t, text, **kw):
        mu, s2, t = jnp.asarray(self.mu), jnp.square(jnp.asarray(self.s)), t[:, None, None, None]
        var = (1 - t) ** 2 * s2 + t**2
        return (t - (1 - t) * s2) / var * (z - (1 - t) * mu) - mu, None


def test_second_order_samplers_beat_euler_and_converge_at_second_order_on_a_gaussian_ode(cfg, relerr):
    mu, s = (0.5, -1.0, 0.2, 1.5), (0.3, 0.5, 1.5, 0.8)
    noise = sampling.initial_noise(3, 8, (4, 6), 4)
    exact = np.asarray(mu) + np.asarray(s) * np.asarray(noise, np.float64)
    err = {}
    for rule, counts in (
        ("euler", (7, 8, 15, 16, 32, 64)),
        ("dpm++2m", (7, 8, 15, 16, 32, 64)),
        ("heun", (4, 8, 16, 32)),
    ):
        for steps in counts:
            fn = sampling.make_sampler(
                cfg,
                steps,
                guidance=False,
                decode=False,
                step_fn=sampling.step_rule(rule)[0],
                denoiser=GaussianField(mu, s),
            )
            err[rule, steps] = relerr(
                fn({"denoiser": {}, "vae": {}}, fake_text(0, 8), None, noise, 1.0).latent_BxhxwxC, exact
            )
    for n in (4, 8):  # equal evaluations: Heun's n steps cost 2n - 1
        nfe = 2 * n - 1
        assert err["heun", n] < 0.5 * err["euler", nfe] and err["dpm++2m", nfe] < 0.5 * err["euler", nfe], err
    order = lambda rule, counts: [float(np.log2(err[rule, a] / err[rule, b])) for a, b in zip(counts, counts[1:])]
    orders = {"euler": order("euler", (8, 16, 32, 64)), "heun": order("heun", (4, 8, 16, 32))}
    orders["dpm++2m"] = order("dpm++2m", (8, 16, 32, 64))
    print({k: f"{v:.2e}" for k, v in err.items()}, {k: [round(p, 2) for p in v] for k, v in orders.items()})
    assert all(0.85 < p < 1.15 for p in orders["euler"]), orders
    assert all(p > 1.85 for p in orders["heun"]), orders
    # DPM-Solver++(2M) reaches order 2 more slowly here: near t = 0 the uniform t grid's steps in
    # lambda = log((1 - t) / t) stay ~log 2 long (measured 2.1, 1.2, 1.5; 1.75 at 128 -> 256 steps;
    # on [0.98, 0.02] it is 2.0 from 16 steps on).
    assert np.mean(orders["dpm++2m"]) > 1.5 and min(orders["dpm++2m"]) > 1.1, orders


class GuidedClock(nn.Module):
    """A denoiser test double: v = a z + b t + the first pooled text feature; its plan (N, 1, 2) is
    (evaluations so far along the carried chain, this evaluation's t)."""

    a: float
    b: float

    def __call__(self, z, t, text, *, prev_plan_BxKxD=None, has_prev_B=None, **kw):
        count = jnp.zeros_like(t) if prev_plan_BxKxD is None else jnp.where(has_prev_B, prev_plan_BxKxD[:, 0, 0], 0.0)
        v = self.a * z + self.b * t[:, None, None, None] + text.pooled[:, :1, None, None]
        return v, jnp.stack([count + 1, t], -1)[:, None]


def test_heun_and_dpm_guide_every_evaluation_and_thread_the_plan_through_them(cfg):
    """Against float64 loops (diffusers' DPM-Solver++ formula in lambda): CFG at every evaluation,
    Heun's 2S - 1 evaluations (predictor at t_k, corrector at t_{k+1}, a last Euler step), and the
    plan started from the previous evaluation's, the first from p_init (the count restarts)."""
    a, b, scale, steps, shift = 0.7, -0.4, 3.0, 3, 2.0
    text, uncond = fake_text(1), fake_text(2, 1, empty=True)
    noise = sampling.initial_noise(4, B, (2, 3), 4)
    mix = np.asarray(uncond.pooled[:, 0], np.float64) + scale * np.asarray(text.pooled[:, 0] - uncond.pooled[:, 0])
    field = lambda z, t: a * z + b * t + mix[:, None, None, None]
    ts = np.asarray(flow.time_grid(steps, shift), np.float64)
    out = {}
    for rule in ("heun", "dpm++2m"):
        fn = sampling.make_sampler(
            cfg, steps, decode=False, keep_plans=True, shift=shift, step_fn=sampling.step_rule(rule)[0],
            denoiser=GuidedClock(a, b),
        )  # fmt: skip
        out[rule] = fn({"denoiser": {}, "vae": {}}, text, uncond, noise, scale)
    z = np.asarray(noise, np.float64)
    for k in range(steps):
        v, dt = field(z, ts[k]), ts[k] - ts[k + 1]
        z = z - dt * v if k == steps - 1 else z - dt / 2 * (v + field(z - dt * v, ts[k + 1]))
    np.testing.assert_allclose(out["heun"].latent_BxhxwxC, z, rtol=1e-5, atol=1e-5)
    with np.errstate(divide="ignore"):
        lam = np.log((1 - ts) / ts)  # -inf at t = 1, +inf at t = 0
    z, x0_prev = np.asarray(noise, np.float64), None
    for k in range(steps):
        x0 = z - ts[k] * field(z, ts[k])
        d1 = 0.0 if k in (0, steps - 1) else (x0 - x0_prev) * (lam[k + 1] - lam[k]) / (lam[k] - lam[k - 1])
        z, x0_prev = ts[k + 1] / ts[k] * z - (1 - ts[k + 1]) * np.expm1(lam[k] - lam[k + 1]) * (x0 + 0.5 * d1), x0
    np.testing.assert_allclose(out["dpm++2m"].latent_BxhxwxC, z, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out["heun"].latent_BxhxwxC) - z).mean() > 1e-3  # two different rules
    for rule, times in (("heun", ts[[0, 1, 1, 2, 2]]), ("dpm++2m", ts[:3])):
        plans = np.asarray(out[rule].plans_SxNxKxD)  # (evaluations, 2B, 1, 2)
        assert plans.shape == (len(times), 2 * B, 1, 2)
        np.testing.assert_array_equal(plans[..., 0, 0], np.arange(1, len(times) + 1)[:, None] * np.ones(2 * B))
        np.testing.assert_allclose(plans[:, 0, 0, 1], times, rtol=1e-6)


def test_unknown_sampler_is_a_value_error_naming_the_samplers(cfg):
    message = r"unknown sampler 'bogus'; samplers are euler, consistency, heun, dpm\+\+2m"
    with pytest.raises(ValueError, match=message):
        sampling.step_rule("bogus")
    with pytest.raises(ValueError, match=message):
        sampling.get_sampler(cfg, 2, sampler="bogus")
    pipe = MicroForgePipeline(load_config("nano", TINY), {"vae": {}, "denoiser": {}}, FakeEncoder())
    with pytest.raises(SampleError, match=message):
        pipe.generate(["a red circle"], steps=2, sampler="bogus")
    with pytest.raises(ValueError, match="deterministic"):
        sampling.make_sampler(cfg, 2, step_fn=flow.heun_step, stochastic=True)


def test_strength_starts_from_the_noised_source_on_a_known_field(cfg, params):
    """SDEdit: z starts at strength * noise + (1 - strength) * the source latent, and Euler steps run
    over the time grid scaled by strength (hand-computed here in float64)."""
    a, b, steps, strength = 0.7, -0.3, 2, 0.6
    noise = sampling.initial_noise(3, B, (H // 4, W // 4), 4)
    src = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (B, H, W, 3)), jnp.float32)
    vae = build_vae(cfg)
    mode = vae.apply({"params": params["vae"]}, src, method="encode").mode()
    src_lat = (np.asarray(mode, np.float64) - cfg.vae.shift_factor) * cfg.vae.scaling_factor
    s = sampling.make_sampler(
        cfg, steps, guidance=False, decode=False, with_source=True, strength=strength, denoiser=LinearField(a, b)
    )
    z = np.asarray(s(params, fake_text(0), None, noise, 1.0, src, task_id("edit")).latent_BxhxwxC, np.float64)
    want = strength * np.asarray(noise, np.float64) + (1 - strength) * src_lat
    ts = strength * np.linspace(1, 0, steps + 1)
    for t, t_next in zip(ts[:-1], ts[1:]):
        want = want - (t - t_next) * (a * want + b)
    np.testing.assert_allclose(z, want, rtol=1e-4, atol=1e-5)
    for bad, source in ((0.0, True), (1.5, True), (0.5, False)):
        with pytest.raises(ValueError, match="strength must be in"):
            sampling.make_sampler(cfg, steps, with_source=source, strength=bad)


class SourceField(nn.Module):
    """A denoiser test double: v = a * z + b, plus c * the source latent when it is shown one."""

    a: float
    b: float
    c: float

    def __call__(self, z, t, text, *, source_BxhxwxC=None, **kw):
        v = self.a * z + self.b
        return (v if source_BxhxwxC is None else v + self.c * source_BxhxwxC), None


def test_img2img_starts_from_the_source_without_showing_it(cfg, params):
    """condition_on_source=False (generate from an image): the same start as SDEdit, but the
    denoiser never sees the source; with it shown, the c * source term moves the result."""
    a, b, c, steps, strength = 0.7, -0.3, 0.5, 2, 0.6
    noise = sampling.initial_noise(5, B, (H // 4, W // 4), 4)
    src = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (B, H, W, 3)), jnp.float32)
    mode = build_vae(cfg).apply({"params": params["vae"]}, src, method="encode").mode()
    src_lat = (np.asarray(mode, np.float64) - cfg.vae.shift_factor) * cfg.vae.scaling_factor
    out = {}
    for shown in (False, True):
        s = sampling.make_sampler(
            cfg, steps, guidance=False, decode=False, with_source=True, strength=strength,
            condition_on_source=shown, denoiser=SourceField(a, b, c),
        )  # fmt: skip
        out[shown] = np.asarray(s(params, fake_text(0), None, noise, 1.0, src, 0).latent_BxhxwxC, np.float64)
    want = strength * np.asarray(noise, np.float64) + (1 - strength) * src_lat
    ts = strength * np.linspace(1, 0, steps + 1)
    for t, t_next in zip(ts[:-1], ts[1:]):
        want = want - (t - t_next) * (a * want + b)
    np.testing.assert_allclose(out[False], want, rtol=1e-4, atol=1e-5)
    assert np.abs(out[True] - want).mean() > 1e-2
    with pytest.raises(ValueError, match="needs strength < 1"):
        sampling.make_sampler(cfg, steps, with_source=True, condition_on_source=False)


def test_source_sampler_equals_reference_and_uses_the_source(source_sampler, cfg, params, inputs, relerr):
    text, uncond, noise = inputs
    src = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (B, H, W, 3)), jnp.float32)
    out = source_sampler(params, text, uncond, noise, 3.0, src, task_id("edit"))
    images, z, _ = reference(cfg, params, text, uncond, noise, 3.0, 2, source=src, task="edit")
    assert relerr(out.latent_BxhxwxC, z) <= 1e-5 and relerr(out.images_BxHxWx3, images) <= 1e-5
    other = source_sampler(params, text, uncond, noise, 3.0, -src, task_id("edit"))
    assert relerr(other.images_BxHxWx3, out.images_BxHxWx3) > 1e-2  # the source is used
    inpaint = source_sampler(params, text, uncond, noise, 3.0, src, task_id("inpaint"))
    assert relerr(inpaint.images_BxHxWx3, out.images_BxHxWx3) > 1e-3  # and the task id


def test_vae_slices_give_the_whole_batch_images(cfg, params, inputs, guided_out, relerr):
    # 8 fake devices here, so the default decodes the whole batch; one image per call must agree.
    assert auto_slice_size(jnp.zeros((B, H, W, 3))) == B
    sliced = sampling.make_sampler(cfg, STEPS, vae_slice=1)
    text, uncond, noise = inputs
    out = sliced(params, text, uncond, noise, 3.0)
    assert relerr(out.images_BxHxWx3, guided_out.images_BxHxWx3) <= 1e-5
    assert float(out.images_BxHxWx3.std()) > 0


def test_sharded_batch_equals_one_device(sampler, cfg, params, relerr):
    text, uncond = fake_text(5, 8), fake_text(2, 1, empty=True)
    noise = sampling.initial_noise(4, 8, (H // 4, W // 4), 4)
    one = sampler(params, text, uncond, noise, 3.0)
    mesh = make_mesh(("data",), (8,))
    batch = NamedSharding(mesh, P("data"))
    sharded = sampling.make_sampler(cfg, STEPS, batch_sharding=batch)
    put = lambda x: jax.device_put(x, batch)
    out = sharded(params, jax.tree.map(put, text), uncond, put(noise), 3.0)
    assert out.images_BxHxWx3.sharding.is_equivalent_to(batch, 4)
    assert relerr(out.images_BxHxWx3, one.images_BxHxWx3) <= 1e-5


# ----------------------------------------------------------------------------- tasks and the pipeline


def test_sources_are_built_as_the_dataset_builds_them():
    rec = make_record("inpaint", 3, image_size=32)
    np.testing.assert_array_equal(sampling.inpaint_source(rec["image"], rec["mask"]), rec["source"])
    rec = make_record("sr", 3, image_size=32, sr_factor=4)
    np.testing.assert_array_equal(sampling.sr_source(rec["low_res"], (32, 32)), rec["source"])
    with pytest.raises(ValueError, match="must match"):
        sampling.inpaint_source(rec["image"], np.zeros((16, 32), bool))


class FakeEncoder:
    """A text encoder test double: deterministic width-48 embeddings per prompt."""

    embed_dim = E

    def encode(self, prompts):
        texts = [fake_text(sum(map(ord, p)) + 1000 * len(p), 1, empty=not p) for p in prompts]
        return TextEmbeddings(*(jnp.concatenate(x) for x in zip(*texts)))


@pytest.fixture(scope="module")
def pipe(params):
    return MicroForgePipeline(load_config("nano", TINY + ["image_size=16"]), params, FakeEncoder())


def test_pipeline_runs_all_four_tasks(pipe):
    gen = pipe.generate(["a red circle", "a blue star"], steps=2, cfg=3.0, seed=0, size=(H, W), num=2)
    assert gen.shape == (4, H, W, 3) and gen.dtype == np.uint8 and gen.std() > 1
    assert pipe.last_timing["images"] == 4 and pipe.last_timing["compile_s"] > 0
    edit = pipe.edit(gen[0], "make it blue", steps=2, cfg=3.0)
    assert edit.shape == (1, H, W, 3)
    edit2 = pipe.edit(gen[2], "make it blue", steps=2, cfg=3.0)
    assert np.abs(edit.astype(float) - edit2).mean() > 0.5  # different sources, different outputs
    # strength: near 0 the output is mostly the source, so the noise seed barely matters.
    spread = {}
    for strength in (1.0, 0.1):
        a, b = (pipe.edit(gen[0], "make it blue", steps=2, cfg=3.0, seed=k, strength=strength) for k in (0, 1))
        spread[strength] = np.abs(a.astype(float) - b).mean()
    assert spread[0.1] < 0.5 * spread[1.0], spread  # (random weights: 0.27x measured; ignored strength: 1x)
    # generate from an image (img2img): at strength 0.1 the seed barely matters; from noise it does.
    a, b = (pipe.generate(["a blue star"], steps=2, cfg=3.0, seed=k, init_image=gen[0], strength=0.1) for k in (0, 1))
    assert a.shape == (1, H, W, 3) and np.abs(a.astype(float) - b).mean() < 0.5 * spread[1.0]
    c = pipe.generate(["a blue star"], steps=2, cfg=3.0, seed=0, init_image=gen[2], strength=0.1)
    assert np.abs(a.astype(float) - c).mean() > 2 * np.abs(a.astype(float) - b).mean()  # the image, not the seed
    with pytest.raises(SampleError, match="needs a source image"):
        pipe.generate(["a blue star"], steps=2, strength=0.5)
    with pytest.raises(SampleError, match="give a strength below 1"):
        pipe.generate(["a blue star"], steps=2, init_image=gen[0])
    mask = np.zeros((H, W), bool)
    mask[4:12, 8:16] = True
    assert pipe.inpaint(gen[0], mask, "fill it", steps=2, cfg=3.0).shape == (1, H, W, 3)
    assert pipe.super_resolve(gen[0][::4, ::4], "a red circle", steps=2, cfg=3.0).shape == (1, H, W, 3)
    with pytest.raises(
        ValueError, match=r"multiples of 8 \(the VAE's compression factor 4 x model.backbone.patch_size 2\)"
    ):
        pipe.generate(["x"], size=(18, 24))
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.generate(["x"], size=(20, 24))  # a multiple of the VAE factor, not of factor x patch size
    with pytest.raises(ValueError, match="must match"):
        pipe.inpaint(gen[0], mask[:8], "x")


# ----------------------------------------------------------------------------- sample.py


@pytest.fixture(scope="module")
def sample_main():
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, params):
    """A real run: config.json + Orbax "vae" and "flow" checkpoints, with the "simple" text encoder."""
    from microforge_jax.text import load_text_encoder

    workdir = tmp_path_factory.mktemp("run")
    config = load_config("nano", TINY + ["image_size=16", "model.text.encoder=simple"])
    save_run_config(workdir, config)
    text_params = load_text_encoder(ModelConfig.from_config(config).text).params
    for stage, ema in (("vae", params["vae"]), ("flow", {"denoiser": params["denoiser"], "text": text_params})):
        with StageCheckpointer(workdir, stage) as ckpt:
            ckpt.save(1, {"step": jnp.int32(1), "params": ema, "ema_params": ema, "opt_state": jnp.zeros(())})
            ckpt.wait_until_finished()
    images = tmp_path_factory.mktemp("images")
    Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(images / "src.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "small_mask.png")
    (images / "broken.png").write_bytes(b"not a png")
    return workdir, images


def test_sample_script_writes_pngs_and_timing(sample_main, run_dir, tmp_path, capsys):
    workdir, _ = run_dir
    out = tmp_path / "out"
    argv = ["--workdir", str(workdir), "--prompt", "a red circle", "--prompt", "a star", "--num", "2"]
    rc = cli.run(sample_main, argv + ["--steps", "2", "--size", f"{H}x{W}", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(list(out.glob("*.png"))) == 5 and (out / "grid.png").exists()
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * H, 2 * W, 3)
    assert "per image" in captured.out and "compile" in captured.out


def test_sample_script_samples_with_heun(sample_main, run_dir, tmp_path, capsys):
    workdir, _ = run_dir
    argv = ["--workdir", str(workdir), "--prompt", "a red circle", "--steps", "2", "--size", f"{H}x{W}"]
    rc = cli.run(sample_main, argv + ["--sampler", "heun", "--out", str(tmp_path / "heun")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2 heun steps" in captured.out and len(list((tmp_path / "heun").glob("0*.png"))) == 1


def test_sample_script_low_memory_gives_the_same_pngs(sample_main, run_dir, tmp_path, capsys):
    workdir, _ = run_dir
    argv = ["--workdir", str(workdir), "--prompt", "a red circle", "--steps", "2", "--size", f"{H}x{W}"]
    outs = {}
    for name, extra in (("plain", ["--no-low-memory"]), ("low", ["--low-memory"])):
        rc = cli.run(sample_main, argv + extra + ["--out", str(tmp_path / name)])
        assert rc == 0, capsys.readouterr().err
        outs[name] = [np.asarray(Image.open(p)) for p in sorted((tmp_path / name).glob("0*.png"))]
    assert len(outs["plain"]) == 1 and outs["plain"][0].std() > 1
    np.testing.assert_array_equal(outs["low"][0], outs["plain"][0])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "{tmp}/nope"], "does not exist"),
        (["--workdir", "{tmp}"], "config.json"),
        (["--workdir", "{norun}"], "no checkpoints"),
        (["--task", "edit", "--source", "{images}/broken.png"], "cannot read the source image"),
        (["--task", "inpaint", "--source", "{images}/src.png", "--mask", "{images}/small_mask.png"], "must match"),
        (["--size", "18x24"], "multiples of 8"),
        (["--steps", "0"], "steps must be"),
        (["--cfg", "-1"], "must be >= 0"),
        (["--vae-tile", "-2"], "--vae-tile must be >= 0"),
        (["--strength", "0.5"], "needs a source image"),
        (["--sampler", "bogus"], "unknown sampler 'bogus'; samplers are euler, consistency, heun, dpm++2m"),
        (["--source", "{images}/src.png"], "give a strength below 1"),
        (["--task", "edit", "--source", "{images}/src.png", "--strength", "1.5"], "strength must be in (0, 1]"),
    ],
)
def test_sample_script_bad_input_is_one_line_and_writes_nothing(sample_main, run_dir, tmp_path, capsys, args, message):
    workdir, images = run_dir
    norun = tmp_path / "norun"
    save_run_config(norun, load_config("nano", TINY))  # a config but no checkpoint
    args = [a.format(tmp=tmp_path, images=images, norun=norun) for a in args]
    out = tmp_path / "out"
    argv = ["--workdir", str(workdir), "--prompt", "x", "--steps", "2", "--out", str(out)] + args
    rc = cli.run(sample_main, argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err
    assert not out.exists()
