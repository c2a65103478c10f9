"""The optimizer and the EMA against hand computations: which parameters get the SSM learning rate,
the first AdamW update, clipping by global norm inside the chain, and the EMA's warm-up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from microforge_jax import optim
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models.denoiser import Text, build_denoiser

DEPTH = 2
# What a BiSSM direction owns (DESIGN §2): its conv, x_proj, dt_proj, A_log and D; in_proj and
# out_proj are shared by the two directions and train at the base rate.
SSM_LEAVES = ("conv/kernel", "conv/bias", "x_proj/kernel", "dt_proj/kernel", "dt_proj/bias", "A_log", "D")
HP = dict(lr=1e-3, warmup_steps=0, steps=100, weight_decay=0.01, grad_clip=2.0, ssm_lr_mult=0.5)


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _flat(tree) -> dict[str, np.ndarray]:
    return {_path(p): np.asarray(x, np.float64) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def params():
    """A tiny denoiser's parameter tree (shapes from `jax.eval_shape`, values drawn here)."""
    overrides = ("model.backbone.depth=2", "model.backbone.dim=64", "model.backbone.head_dim=32")
    cfg = ModelConfig.from_config(load_config("nano", overrides + ("model.planner.num_tokens=4",)))
    den, e = build_denoiser(cfg), cfg.backbone.text_dim
    text = Text(jnp.zeros((1, 8, e)), jnp.ones((1, 8), bool), jnp.zeros((1, e)))
    z = jnp.zeros((1, 8, 8, cfg.latent_channels))
    shapes = nn.unbox(jax.eval_shape(lambda: den.init(jax.random.key(0), z, jnp.ones(1), text)))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _tx(**kw) -> optax.GradientTransformation:
    return optim.make_optimizer(ml_collections.ConfigDict({**HP, **kw}))


def _block(params):
    """One backbone block: SSM and other parameters, matrices and vectors, and a short compile."""
    return {"backbone": {"block0": params["backbone"]["block0"]}}


def _grads(params, seed: int, norm: float):
    """Gaussian gradients (numpy: eager jax ops would compile once per shape) of global norm `norm`."""
    rng = np.random.default_rng(seed)
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
    total = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda g: (g * (norm / total)).astype(np.float32), grads)


def _ssm_names(params) -> set[str]:
    return {name for name, label in _flat_labels(params).items() if label == "ssm"}


def _flat_labels(params) -> dict[str, str]:
    return {_path(p): label for p, label in jax.tree_util.tree_leaves_with_path(optim.param_labels(params))}


def _first_update(grads, params):
    """(updates, optimizer state) of the first step from a fresh state."""
    tx = _tx()
    return jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)


def test_ssm_learning_rate_labels_exactly_the_bissm_direction_parameters(params):
    expected = {
        f"backbone/block{i}/mixer/{d}_{leaf}" for i in range(DEPTH) for d in ("fwd", "bwd") for leaf in SSM_LEAVES
    }
    assert _ssm_names(params) == expected
    assert len(_flat_labels(params)) > 4 * len(expected)  # the planner, attention, FFN, ... are "other"


def test_first_update_is_lr_times_the_adam_step_with_the_ssm_multiplier(params):
    """AdamW's first step is `-lr * (g / (|g| + eps) + wd * p)` (decay on matrices only), the
    SSM parameters' at `ssm_lr_mult * lr`; the gradient is under the clipping norm."""
    params = _block(params)
    grads = _grads(params, 1, 1.0)  # under grad_clip (2)
    updates, _ = _first_update(grads, params)
    got, g_flat, p_flat, ssm = _flat(updates), _flat(grads), _flat(params), _ssm_names(params)
    assert len(ssm) == 14 and len(g_flat) > len(ssm)
    errs = {}
    for name, g in g_flat.items():
        lr = HP["lr"] * (HP["ssm_lr_mult"] if name in ssm else 1.0)
        decay = HP["weight_decay"] * p_flat[name] if g.ndim >= 2 else 0.0
        want = -lr * (g / (np.abs(g) + 1e-8) + decay)
        errs[name] = np.linalg.norm(got[name] - want) / np.linalg.norm(want)
    print(f"first AdamW update vs by hand: worst leaf {max(errs.values()):.1e}")
    assert max(errs.values()) <= 1e-5, max(errs, key=errs.get)  # fp32 bias corrections: 6.7e-7 measured


def _adam_mu(opt_state) -> dict[str, np.ndarray]:
    """Adam's first moments by parameter path, from every partition of the optimizer state."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    mu = {}
    for state in (s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)):
        mu |= _flat(state.mu)  # each partition holds its own parameters (the others are masked out)
    return mu


@pytest.mark.parametrize("norm", [1.5, 1e6])
def test_the_chain_clips_the_gradient_to_grad_clip_before_adam(params, norm):
    """Adam's first moment after one update is (1 - b1) * the gradient it was given: the gradient
    scaled to global norm `grad_clip` when it was longer, untouched when it was shorter."""
    params = _block(params)
    grads = _grads(params, 2, norm)
    _, state = _first_update(grads, params)
    mu, g_flat = _adam_mu(state), _flat(grads)
    assert set(mu) == set(g_flat)
    scale = min(1.0, HP["grad_clip"] / norm)
    given = np.concatenate([mu[n].ravel() / 0.1 for n in g_flat])
    want = np.concatenate([g.ravel() * scale for g in g_flat.values()])
    err = np.linalg.norm(given - want) / np.linalg.norm(want)
    print(f"gradient of norm {norm:g} as Adam got it: norm {np.linalg.norm(given):.7f}, vs by hand {err:.1e}")
    assert err <= 1e-6  # 4e-8 measured
    np.testing.assert_allclose(np.linalg.norm(given), min(norm, HP["grad_clip"]), rtol=1e-6)


def test_ema_is_the_running_mean_of_the_updates_until_the_decay_applies():
    """The train steps call `ema_update(ema, params_after_update, step_before_it, decay)`: the k-th
    update (k = 1, 2, ...) has decay min(decay, (k - 1) / k), so the EMA is the mean of the k
    parameter values up to k = 1 / (1 - decay) (200 for 0.995), then a plain EMA."""
    decay = 0.995
    rng = np.random.default_rng(3)
    values = rng.standard_normal((201, 5)).astype(np.float32)
    update = jax.jit(optim.ema_update, static_argnums=3)
    ema = {"w": jnp.full(5, 123.0)}  # the initial EMA (the init's parameters) is forgotten at once
    worst = 0.0
    for k, p in enumerate(values, start=1):
        before = np.asarray(ema["w"], np.float64)
        ema = update(ema, {"w": jnp.asarray(p)}, jnp.int32(k - 1), decay)
        got = np.asarray(ema["w"], np.float64)
        if k == 1:
            np.testing.assert_array_equal(got, p)
        elif k <= 200:
            worst = max(worst, float(np.abs(got - values[:k].astype(np.float64).mean(0)).max()))
        else:
            # 2.5e-5 * |p - mean| away from the running mean: atol 1e-6 tells them apart.
            np.testing.assert_allclose(got, decay * before + (1 - decay) * p, rtol=0, atol=1e-6)
    print(f"EMA vs the running mean over 200 updates: max abs difference {worst:.1e}")
    assert worst <= 2e-6  # 2.1e-7 measured


def test_ema_decay_warms_up_as_step_over_step_plus_one_then_is_decay():
    decay = 0.995
    steps = np.arange(0, 5000)
    got = np.asarray(optim.ema_decay(jnp.asarray(steps), decay), np.float64)
    want = np.minimum(decay, steps / (1.0 + steps))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert got[0] == 0.0 and (got[:199] < np.float32(decay)).all()
    assert (got[199:] == np.float32(decay)).all()  # exactly `decay` from step 199 on
    # After the warm-up, one update is the textbook EMA.
    ema, p = np.float32(2.0), np.float32(-1.0)
    out = optim.ema_update({"w": jnp.float32(ema)}, {"w": jnp.float32(p)}, jnp.int32(1000), decay)["w"]
    np.testing.assert_allclose(float(out), decay * 2.0 + (1 - decay) * -1.0, rtol=1e-6)
