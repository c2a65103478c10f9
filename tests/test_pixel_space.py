"""Pixel space (`model.vae.kind="pixel"`) and clean-image prediction (`model.backbone.prediction="x"`).

The pixel "VAE" is the identity with no parameters; x-prediction returns the velocity
(z_t - x0_hat) / max(t, 0.05), checked against the same network's raw output by hand, against the
PyTorch mirror (planner READing patches), and through one Euler step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from microforge_jax import flow
from microforge_jax.config import ConfigError, ModelConfig, load_config
from microforge_jax.export import convert
from microforge_jax.export import torch_model as tm
from microforge_jax.models.backbone import X_PRED_MIN_T
from microforge_jax.models.denoiser import Text, build_denoiser
from microforge_jax.models.vae import PIXEL_LOGVAR, build_vae

PIXEL = [
    "model.vae.kind=pixel",
    "model.vae.downsample_factor=1",
    "model.latent_channels=3",
    "model.backbone.depth=2",
    "model.backbone.dim=64",
    "model.backbone.head_dim=32",
    "model.backbone.shared_attn_every=1",
    "model.backbone.patch_size=4",
    "model.planner.patch_size=4",
    "model.planner.num_tokens=4",
    "model.planner.depth=1",
    "model.text.embed_dim=48",
    "model.text.encoder=simple",
    "image_size=16",
]
B, H, W, K, D, M = 2, 16, 24, 4, 64, 6  # 4x6 tokens of 4x4 pixels: non-square, so h/w mix-ups show
TOL = 1e-5


def _cfg(*extra: str) -> ModelConfig:
    return ModelConfig.from_config(load_config("nano", PIXEL + list(extra)))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    text = Text(f(B, M, 48), np.array([[1] * M, [1] * 3 + [0] * 3], bool), f(B, 48))
    return {"z": f(B, H, W, 3), "t": np.array([0.6, 0.02], np.float32), "text": text, "plan": f(B, K, D)}


@pytest.fixture(scope="module")
def dparams(inputs, redraw):
    den = build_denoiser(_cfg("model.backbone.prediction=x"))
    init = lambda: den.init(jax.random.key(0), inputs["z"], inputs["t"], inputs["text"], prev_plan_BxKxD=inputs["plan"])
    return redraw(jax.tree.map(np.asarray, init()["params"]), seed=11)


def test_pixel_vae_is_the_identity_with_no_parameters():
    cfg = _cfg()
    vae = build_vae(cfg)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32))
    variables = vae.init(jax.random.key(0), x)
    assert jax.tree.leaves(variables) == []
    post = vae.apply(variables, x, method="encode")
    np.testing.assert_array_equal(post.mode(), x)
    np.testing.assert_array_equal(post.logvar, np.full(x.shape, PIXEL_LOGVAR, np.float32))
    assert float(jnp.abs(post.sample(jax.random.key(1)) - x).max()) < 1e-5  # std exp(-15)
    np.testing.assert_array_equal(vae.apply(variables, x, method="decode"), x)
    m = tm.DCVAE(dataclasses.asdict(cfg))
    assert len(m.state_dict()) == 0
    mean, logvar = m.encode(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2))
    np.testing.assert_array_equal(mean.permute(0, 2, 3, 1).numpy(), x)
    assert float(logvar.max()) == PIXEL_LOGVAR


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.vae.downsample_factor=4"], "downsample_factor=1"),
        (["model.latent_channels=4"], "latent_channels=3"),
        (["model.backbone.prediction=eps"], "prediction"),
        (["model.planner.patch_size=0"], "planner.patch_size"),
    ],
)
def test_bad_pixel_configs_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*overrides)


def test_x_prediction_is_the_velocity_of_the_predicted_clean_image(inputs, dparams, relerr):
    """The same parameters as a velocity network give x0_hat; x-prediction must return (z - x0_hat) / max(t, 0.05)."""
    z, tt, text, plan = inputs["z"], inputs["t"], inputs["text"], inputs["plan"]
    outs = {}
    for pred in ("velocity", "x"):
        den = build_denoiser(_cfg(f"model.backbone.prediction={pred}"))
        outs[pred] = np.asarray(den.apply({"params": dparams}, z, tt, text, plan, method="velocity"), np.float64)
    x0_hat = outs["velocity"]  # the raw network output
    assert x0_hat.std() > 1e-2
    t_clip = np.maximum(tt.astype(np.float64), 0.05)[:, None, None, None]
    assert X_PRED_MIN_T == 0.05 and tt[1] < 0.05  # the second example exercises the clip
    expected = (z.astype(np.float64) - x0_hat) / t_clip
    assert relerr(outs["x"], expected) < 1e-6
    # One Euler step from t to t' moves z to z - (t - t') (z - x0_hat) / t: at t' = 0 (and t >= 0.05), x0_hat.
    t0 = np.array([0.6, 0.6], np.float32)
    den = build_denoiser(_cfg("model.backbone.prediction=x"))
    v = den.apply({"params": dparams}, z, t0, text, plan, method="velocity")
    raw = build_denoiser(_cfg()).apply({"params": dparams}, z, t0, text, plan, method="velocity")
    stepped = flow.euler_step(jnp.asarray(z), v, t0, jnp.zeros(2))
    assert relerr(stepped, raw) < 1e-5


def test_pixel_x_prediction_denoiser_matches_pytorch(inputs, dparams, relerr):
    cfg = _cfg("model.backbone.prediction=x")
    den = build_denoiser(cfg)
    z, tt, text, plan = inputs["z"], inputs["t"], inputs["text"], inputs["plan"]
    has_prev = np.array([True, False])
    v_j, plan_j = den.apply({"params": dparams}, z, tt, text, prev_plan_BxKxD=plan, has_prev_B=has_prev)
    assert np.asarray(v_j).std() > 1e-2 and np.asarray(plan_j).std() > 1e-2
    assert dparams["planner"]["latent_proj"]["kernel"].shape == (3 * 4 * 4, D)  # READs 4x4-pixel patches
    m = tm.Denoiser(dataclasses.asdict(cfg)).eval()
    state = convert.jax_to_torch({"d": dparams}, torch.nn.ModuleDict({"d": m}))
    m.load_state_dict({k.removeprefix("d."): v for k, v in state.items()}, strict=True)
    tt_ = lambda x: torch.from_numpy(np.asarray(x))
    with torch.no_grad():
        v_t, plan_t = m(tt_(z).permute(0, 3, 1, 2), tt_(tt), *(tt_(x) for x in text), tt_(plan), tt_(has_prev))
    assert relerr(plan_t.numpy(), plan_j) <= TOL
    assert relerr(v_t.permute(0, 2, 3, 1).numpy(), v_j) <= TOL


def test_source_residual_predicts_the_change_from_the_source(inputs, dparams, relerr):
    """source_residual: x0_hat = source + network output, so v = (z - source - out) / t; same in PyTorch."""
    z, tt, text, plan = inputs["z"], inputs["t"], inputs["text"], inputs["plan"]
    source = np.random.default_rng(7).uniform(-1, 1, z.shape).astype(np.float32)
    task = np.array([1, 3], np.int32)
    outs = {}
    for res in (False, True):
        cfg = _cfg("model.backbone.prediction=x", f"model.backbone.source_residual={res}")
        den = build_denoiser(cfg)
        outs[res] = np.asarray(
            den.apply({"params": dparams}, z, tt, text, plan, task, source, method="velocity"), np.float64
        )
    t_clip = np.maximum(tt.astype(np.float64), 0.05)[:, None, None, None]
    assert relerr(outs[True], outs[False] - source / t_clip) < 1e-6
    m = tm.Denoiser(dataclasses.asdict(cfg)).eval()
    state = convert.jax_to_torch({"d": dparams}, torch.nn.ModuleDict({"d": m}))
    m.load_state_dict({k.removeprefix("d."): v for k, v in state.items()}, strict=True)
    tt_ = lambda x: torch.from_numpy(np.asarray(x))
    with torch.no_grad():
        v_t = m.backbone(
            tt_(z).permute(0, 3, 1, 2), tt_(tt), *(tt_(x) for x in text), tt_(plan), tt_(task),
            tt_(source).permute(0, 3, 1, 2),
        )  # fmt: skip
    assert relerr(v_t.permute(0, 2, 3, 1).numpy(), outs[True]) <= TOL
    with pytest.raises(ConfigError, match="source_residual"):
        _cfg("model.backbone.source_residual=true")
