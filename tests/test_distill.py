"""Stages 4 (distill) and 6 (consistency): the losses by hand, the EMA target, the step rule, the stages.

The pure-function tests use redrawn parameters (DESIGN §7), fake text embeddings of width 48 and
test doubles for the teacher; the stage test trains the whole curriculum 2 steps per stage on the
TINY config of test_train, then samples it with sample.py.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import TINY

from microforge_jax import checkpoint, cli, distill, flow, sampling, train_lib
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.train_steps import FlowStep

ROOT = Path(__file__).resolve().parent.parent
B, M, E = 4, 6, 48
HW, C = (2, 3), 4  # a 2x3 latent grid of 4 channels
SMALL = [
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
    "model.backbone.patch_size=1",  # the 2x3 grid: one latent cell per token
]


def fake_text(seed: int, batch: int = B, empty: bool = False) -> Text:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((batch, M, E)).astype(np.float32)
    mask = np.zeros((batch, M), bool)
    mask[:, : 2 if empty else M - 1] = True
    tokens[~mask] = 0
    return Text(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(tokens[:, :2].mean(1)))


class LinearField(nn.Module):
    """A denoiser test double (a fake teacher): v = a * z + b, no planner."""

    cfg: ModelConfig
    a: float
    b: float

    def __call__(self, z, t, text, **kw):
        return self.a * z + self.b, None


class TextField(nn.Module):
    """A text-dependent fake teacher: v = a * z + mean(pooled text), no planner."""

    cfg: ModelConfig
    a: float

    def __call__(self, z, t, text, **kw):
        return self.a * z + text.pooled.mean(-1).reshape(-1, 1, 1, 1), None


class PerfectX0(nn.Module):
    """A test double whose x0 estimate z - t v is exactly `target(shape)`: v = (z - x0) / t."""

    cfg: ModelConfig

    def __call__(self, z, t, text, **kw):
        return (z - perfect_x0(z.shape)) / t.reshape((-1,) + (1,) * (z.ndim - 1)), None


def perfect_x0(shape) -> jax.Array:
    return jnp.sin(jnp.arange(int(np.prod(shape)), dtype=jnp.float32)).reshape(shape)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.from_config(load_config("nano", SMALL))


@pytest.fixture(scope="module")
def no_planner_cfg(cfg) -> ModelConfig:
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, use_planner=False))


@pytest.fixture(scope="module")
def den(cfg):
    return build_denoiser(cfg)


@pytest.fixture(scope="module")
def params(den, redraw):
    """Student and EMA parameters, both redrawn (different seeds)."""
    z, t = jnp.zeros((1, *HW, C)), jnp.ones(1)
    init = jax.jit(lambda: den.init(jax.random.key(0), z, t, fake_text(0, 1), prev_plan_BxKxD=jnp.zeros((1, 4, 64))))()
    return (
        {"denoiser": {"params": redraw(init["params"], seed=1)}},
        {"denoiser": {"params": redraw(init["params"], seed=3)}},
    )


@pytest.fixture(scope="module")
def mb():
    """One micro-batch as the steps build it: no caption dropout, no previous plan (checked by hand)."""
    rng = np.random.default_rng(0)
    text = fake_text(1)
    return {
        "z_t": jnp.asarray(rng.standard_normal((B, *HW, C)), jnp.float32),
        "target": jnp.asarray(rng.standard_normal((B, *HW, C)), jnp.float32),
        "t": jnp.asarray([0.1, 0.4, 0.6, 0.95], jnp.float32),
        "t_prev": jnp.asarray([0.0, 0.3, 0.5, 0.8], jnp.float32),
        "drop": jnp.zeros((B,), bool),
        "has_prev": jnp.zeros((B,), bool),
        "text_tokens": text.tokens,
        "text_mask": text.mask,
        "text_pooled": text.pooled,
    }


def make_spec(den, teacher, weight: float = 1.0) -> distill.DistillStep:
    hp = ml_collections.ConfigDict({"ema_decay": 0.99})
    return distill.DistillStep(FlowStep(den, None, None, hp), teacher, weight)


FROZEN = {"empty_text": fake_text(2, 1, empty=True), "teacher": {"denoiser": {}}}
A, BIAS = 0.7, -0.3


def student_v(den, p, z, t, text=None):
    return np.asarray(den.apply(p["denoiser"], z, t, text or fake_text(1))[0], np.float64)


# ----------------------------------------------------------------------------- stage 4: the distill loss


def test_distill_loss_equals_hand_computation(den, params, mb, no_planner_cfg, relerr):
    lam = 0.7
    spec = make_spec(den, LinearField(no_planner_cfg, A, BIAS), weight=lam)
    total, parts = jax.jit(lambda p: distill.distill_loss_fn(spec, p, mb, FROZEN))(params[0])
    v_s = student_v(den, params[0], mb["z_t"], mb["t"])
    assert v_s.std() > 0.1 and relerr(student_v(den, params[0], mb["z_t"], mb["t"], fake_text(5)), v_s) > 1e-2
    z, tgt, t = (np.asarray(mb[k], np.float64) for k in ("z_t", "target", "t"))
    v_t = A * z + BIAS
    w = 1.0 / (1.0 + np.abs(2.0 * t - 1.0))
    flow_hand = np.mean(w * np.mean((v_s - tgt) ** 2, axis=(1, 2, 3)))
    distill_hand = np.mean(w * np.mean((v_s - v_t) ** 2, axis=(1, 2, 3)))
    assert distill_hand > 0.1
    assert relerr(parts["flow_loss"], flow_hand) <= 1e-5
    assert relerr(parts["distill_loss"], distill_hand) <= 1e-5
    assert relerr(total, flow_hand + lam * distill_hand) <= 1e-5
    # lambda = 0: the flow loss itself.
    spec0 = make_spec(den, LinearField(no_planner_cfg, A, BIAS), weight=0.0)
    total0, _ = distill.distill_loss_fn(spec0, params[0], mb, FROZEN)
    assert relerr(total0, flow.flow_loss(jnp.asarray(v_s, jnp.float32), mb["target"], mb["t"])) <= 1e-5


def test_distill_term_is_zero_when_the_teacher_is_the_student(den, params, mb):
    spec = make_spec(den, den, weight=1.0)
    mixed = dict(mb, has_prev=jnp.asarray([True, False, True, False]))  # the planner's self-conditioning too
    frozen = dict(FROZEN, teacher=params[0])
    _, parts = jax.jit(lambda p: distill.distill_loss_fn(spec, p, mixed, frozen))(params[0])
    assert float(parts["flow_loss"]) > 0.1
    assert abs(float(parts["distill_loss"])) <= 1e-10
    # ... and another teacher (the EMA's weights) is not at distance 0.
    _, parts = distill.distill_loss_fn(spec, params[0], mixed, dict(FROZEN, teacher=params[1]))
    assert float(parts["distill_loss"]) > 1e-2


# ----------------------------------------------------------------------------- stage 6: the consistency target


def test_consistency_target_uses_the_ema_params_by_hand(den, params, mb, no_planner_cfg, relerr):
    student, ema = params
    spec = make_spec(den, LinearField(no_planner_cfg, A, BIAS))
    target = np.asarray(distill.consistency_target(spec, ema, mb, FROZEN), np.float64)
    z, t, tp = (np.asarray(mb[k], np.float64) for k in ("z_t", "t", "t_prev"))
    bc = lambda x: x.reshape(-1, 1, 1, 1)
    z_prev = z - bc(t - tp) * (A * z + BIAS)  # one Euler step of the teacher toward the data
    v_ema = student_v(den, ema, jnp.asarray(z_prev, jnp.float32), mb["t_prev"])
    want = z_prev - bc(tp) * v_ema
    assert relerr(target, want) <= 1e-5
    # Not the student's params: their x0 estimate at (z_t', t') is another one.
    v_student = student_v(den, student, jnp.asarray(z_prev, jnp.float32), mb["t_prev"])
    assert relerr(z_prev - bc(tp) * v_student, want) > 1e-3
    # Boundary condition f(z, 0) = z: at t' = 0 (first row) the target is the teacher's Euler step itself.
    np.testing.assert_allclose(target[0], z_prev[0], rtol=0, atol=1e-6)
    z0 = jnp.asarray(z, jnp.float32)
    np.testing.assert_array_equal(np.asarray(sampling.x0_from_velocity(z0, z0 * 3.0 + 1.0, 0.0)), np.asarray(z0))


def test_guided_teacher_step_mixes_cond_and_empty_prompt(den, params, mb, no_planner_cfg, relerr):
    """teacher_cfg = s: the Euler step uses v_u + s (v_c - v_u), v_u at the empty prompt."""
    scale = 3.0
    teacher = TextField(no_planner_cfg, A)
    spec = dataclasses.replace(make_spec(den, teacher), teacher_cfg=scale)
    target = np.asarray(distill.consistency_target(spec, params[1], mb, FROZEN), np.float64)
    z, t, tp = (np.asarray(mb[k], np.float64) for k in ("z_t", "t", "t_prev"))
    bc = lambda x: x.reshape(-1, 1, 1, 1)
    c = bc(np.asarray(mb["text_pooled"], np.float64).mean(-1))
    u = np.asarray(FROZEN["empty_text"].pooled, np.float64).mean()
    z_prev = z - bc(t - tp) * (A * z + u + scale * (c - u))
    want = z_prev - bc(tp) * student_v(den, params[1], jnp.asarray(z_prev, jnp.float32), mb["t_prev"])
    assert relerr(target, want) <= 1e-5
    unguided = np.asarray(distill.consistency_target(make_spec(den, teacher), params[1], mb, FROZEN))
    assert relerr(unguided, want) > 1e-3


def test_consistency_loss_takes_no_gradient_through_the_target(den, params, mb, no_planner_cfg, relerr):
    student, ema = params
    spec = make_spec(den, LinearField(no_planner_cfg, A, BIAS))
    loss_fn = lambda p, e: distill.consistency_loss_fn(spec, p, e, mb, FROZEN)[0]
    loss, (g_student, g_ema) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(student, ema)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_ema))
    assert float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(g_student)))) > 1e-4
    # The loss is ||f_theta(z_t, t) - target||^2 with f = z - t v.
    f = np.asarray(mb["z_t"], np.float64) - np.asarray(mb["t"]).reshape(-1, 1, 1, 1) * student_v(
        den, student, mb["z_t"], mb["t"]
    )
    target = np.asarray(distill.consistency_target(spec, ema, mb, FROZEN), np.float64)
    assert relerr(loss, np.mean((f - target) ** 2)) <= 1e-5


def test_consistency_times_are_neighbours_on_the_grid():
    t, tp = distill.consistency_times(jax.random.key(0), 512, 16, 1.0)
    n = np.rint(np.asarray(t) * 16)
    np.testing.assert_allclose(np.asarray(t) * 16, n, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tp), (n - 1) / 16, atol=1e-6)
    assert n.min() == 1 and n.max() == 16


# ----------------------------------------------------------------------------- the consistency sampler


def test_consistency_step_rule_on_a_known_velocity_field(no_planner_cfg):
    key = jax.random.key(3)
    z = sampling.initial_noise(1, 2, HW, C)
    v = A * z + BIAS
    got = sampling.consistency_step(z, v, jnp.float32(0.75), jnp.float32(0.25), key)
    eps = np.asarray(jax.random.normal(key, z.shape), np.float64)
    z64 = np.asarray(z, np.float64)
    want = 0.75 * (z64 - 0.75 * (A * z64 + BIAS)) + 0.25 * eps
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # Through the sampler (2 steps, t = 1 -> 0.5 -> 0), keys split from the sampler's key.
    text = fake_text(0, 2)
    s = sampling.make_sampler(
        no_planner_cfg,
        2,
        guidance=False,
        decode=False,
        step_fn=sampling.consistency_step,
        stochastic=True,
        denoiser=LinearField(no_planner_cfg, A, BIAS),
    )
    out = np.asarray(s({"denoiser": {}, "vae": {}}, text, None, z, 1.0, key=key).latent_BxhxwxC, np.float64)
    keys = jax.random.split(key, 2)
    x0 = z64 - 1.0 * (A * z64 + BIAS)
    mid = 0.5 * x0 + 0.5 * np.asarray(jax.random.normal(keys[0], z.shape), np.float64)
    want = mid - 0.5 * (A * mid + BIAS)  # the last step (t_next = 0) returns its x0 estimate
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pass a key iff"):
        s({"denoiser": {}, "vae": {}}, text, None, z, 1.0)


@pytest.mark.parametrize("steps", [1, 4])
def test_sampling_with_a_perfect_x0_predictor_returns_x0(no_planner_cfg, steps):
    z = sampling.initial_noise(2, 2, HW, C)
    s = sampling.make_sampler(
        no_planner_cfg,
        steps,
        guidance=False,
        decode=False,
        step_fn=sampling.consistency_step,
        stochastic=True,
        denoiser=PerfectX0(no_planner_cfg),
    )
    out = s({"denoiser": {}, "vae": {}}, fake_text(0, 2), None, z, 1.0, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(out.latent_BxhxwxC), np.asarray(perfect_x0(z.shape)), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- both stages through the trainer

STAGES = ("vae", "flow", "distill", "consistency")


def _config(*overrides, steps=2, batch=8):
    per_stage = [f"train.{s}.{k}={v}" for s in STAGES for k, v in (("steps", steps), ("batch_size", batch))]
    extra = (f"stages={STAGES!r}", "eval_batches=1", "sample_steps=2")
    return load_config("nano", TINY + tuple(per_stage) + extra + tuple(overrides))


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_lib.train_and_evaluate(_config(), workdir)
    return workdir


def test_both_stages_train_checkpoint_and_log(distilled_run):
    workdir = distilled_run
    assert checkpoint.latest_steps(workdir) == {"vae": 2, "flow": 2, "distill": 2, "consistency": 2}
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    for stage, key in (("distill", "train/distill_loss"), ("consistency", "train/consistency_loss")):
        values = [r[key] for r in lines if r["stage"] == stage and key in r]
        assert len(values) == 2 and all(np.isfinite(values)), stage
    assert any("val/loss" in r for r in lines if r["stage"] == "distill")
    assert (workdir / "samples" / "consistency_2.png").is_file() and (workdir / "samples" / "distill_2.png").is_file()


def test_rerun_says_already_trained_and_changes_nothing(distilled_run, capsys):
    workdir = distilled_run
    before = {s: sorted(p.name for p in (workdir / "checkpoints" / s).iterdir()) for s in ("distill", "consistency")}
    train_lib.train_and_evaluate(_config(), workdir)
    out = capsys.readouterr().out
    assert "[distill] already trained" in out and "[consistency] already trained" in out
    assert {s: sorted(p.name for p in (workdir / "checkpoints" / s).iterdir()) for s in before} == before


def test_load_run_returns_the_consistency_weights(distilled_run):
    _, params = checkpoint.load_run(distilled_run)
    cons = checkpoint.restore_stage_params(distilled_run, "consistency", ("ema_params",))["ema_params"]
    dist = checkpoint.restore_stage_params(distilled_run, "distill", ("ema_params",))["ema_params"]
    for a, b in zip(jax.tree.leaves(params["denoiser"]), jax.tree.leaves(cons["denoiser"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(*map(jax.tree.leaves, (cons, dist)))]
    assert max(diffs) > 0  # the consistency stage moved the weights


def test_sample_script_one_step_uses_the_consistency_sampler(distilled_run, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sample_script", ROOT / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    argv = ["--workdir", str(distilled_run), "--prompt", "a red circle", "--num", "2", "--steps", "1"]
    rc = cli.run(module.main, argv + ["--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(list(out.glob("*.png"))) == 3 and (out / "grid.png").is_file()
    assert "1 consistency steps" in captured.out


def test_pipeline_picks_the_sampler_by_run_and_steps(distilled_run):
    from microforge_jax.pipeline import MicroForgePipeline, SampleError

    pipe = MicroForgePipeline.from_run(distilled_run)
    assert pipe.consistency
    assert [pipe.resolve_sampler(None, s) for s in (1, 2, 4, 8)] == ["consistency"] * 3 + ["euler"]
    assert pipe.resolve_sampler("euler", 1) == "euler"
    with pytest.raises(SampleError, match="unknown sampler"):
        pipe.resolve_sampler("ddim", 1)


def test_a_teacher_run_must_share_the_vae_and_text(distilled_run, tmp_path):
    config, params = checkpoint.load_run(distilled_run)
    with config.unlocked():
        config.train.distill.teacher = str(distilled_run)
    module, teacher, name = distill.load_teacher("distill", config, tmp_path, params["vae"])
    assert module is not None and set(teacher) == {"denoiser"} and str(distilled_run) in name
    other_vae = jax.tree.map(lambda x: x + 1e-3, params["vae"])
    with pytest.raises(checkpoint.RunError, match="another VAE"):
        distill.load_teacher("distill", config, tmp_path, other_vae)
    with config.unlocked():
        config.model.text.max_length = 12
    with pytest.raises(checkpoint.RunError, match="model.text differs"):
        distill.load_teacher("distill", config, tmp_path, params["vae"])
    with config.unlocked():
        config.train.distill.teacher = ""
    with pytest.raises(checkpoint.RunError, match="needs a teacher"):
        distill.load_teacher("distill", config, tmp_path, params["vae"])
