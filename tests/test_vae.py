"""The DC-VAE: seed parameter counts, shortcuts equal to PyTorch's, shapes at any valid size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models import vae as vae_lib

SEED_VAE_PARAMS = {"tiny": 16e6, "small": 77e6, "base": 110e6}


def _cfg(name, *overrides):
    return ModelConfig.from_config(load_config(name, overrides))


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("name", sorted(SEED_VAE_PARAMS))
def test_parameter_count_matches_seed(name):
    cfg = _cfg(name)
    model = vae_lib.build_vae(cfg)
    f = cfg.vae.downsample_factor
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, f, f, 3))))
    n = _count(shapes)
    assert abs(n / SEED_VAE_PARAMS[name] - 1) <= 0.15, (
        f"{name}: {n / 1e6:.1f}M vs seed {SEED_VAE_PARAMS[name] / 1e6:.0f}M"
    )


# ----------------------------------------------------------------------------- shortcuts vs PyTorch


def _to_torch(x_nhwc):
    return torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2)


def _from_torch(x_nchw):
    return x_nchw.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("c_in,c_out", [(8, 16), (16, 16), (4, 8), (16, 32)])
def test_downsample_shortcut_equals_pytorch(c_in, c_out, relerr):
    x = np.random.default_rng(0).standard_normal((2, 8, 6, c_in)).astype(np.float32)
    ours = vae_lib.downsample_shortcut(jnp.asarray(x), c_out)
    t = F.pixel_unshuffle(_to_torch(x), 2)  # (B, 4 c_in, H/2, W/2), channel order (c, r1, r2)
    b, c, h, w = t.shape
    ref = t.reshape(b, c_out, c // c_out, h, w).mean(dim=2)
    assert ours.shape == (2, 4, 3, c_out)
    assert relerr(ours, _from_torch(ref)) <= 1e-6


@pytest.mark.parametrize("c_in,c_out", [(16, 8), (16, 16), (32, 16), (8, 4)])
def test_upsample_shortcut_equals_pytorch(c_in, c_out, relerr):
    x = np.random.default_rng(1).standard_normal((2, 3, 5, c_in)).astype(np.float32)
    ours = vae_lib.upsample_shortcut(jnp.asarray(x), c_out)
    t = _to_torch(x).repeat_interleave(4 * c_out // c_in, dim=1)
    ref = F.pixel_shuffle(t, 2)
    assert ours.shape == (2, 6, 10, c_out)
    assert relerr(ours, _from_torch(ref)) <= 1e-6


def test_pixel_shuffle_inverts_unshuffle():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    np.testing.assert_array_equal(vae_lib.pixel_shuffle(vae_lib.pixel_unshuffle(x)), x)
    np.testing.assert_array_equal(vae_lib.pixel_unshuffle(x), _from_torch(F.pixel_unshuffle(_to_torch(x), 2)))


def test_latent_head_shortcuts_use_consecutive_channels():
    x = jnp.arange(6, dtype=jnp.float32).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(vae_lib.channel_average(x, 3)[0, 0, 0], [0.5, 2.5, 4.5])
    np.testing.assert_array_equal(vae_lib.channel_repeat(x[..., :2], 4)[0, 0, 0], [0, 0, 1, 1])


# ----------------------------------------------------------------------------- encode / decode


@functools.lru_cache(maxsize=None)
def _model_and_params(name):
    cfg = _cfg(name)
    model = vae_lib.build_vae(cfg)
    f = cfg.vae.downsample_factor
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, f, f, 3)))
    return cfg, model, params


@pytest.mark.parametrize("name", ["nano", "tiny", "small", "base"])
def test_encode_decode_shapes_at_two_resolutions(name):
    cfg, model, params = _model_and_params(name)
    f, c = cfg.vae.downsample_factor, cfg.latent_channels
    encode = jax.jit(functools.partial(model.apply, method=model.encode))
    decode = jax.jit(functools.partial(model.apply, method=model.decode))
    rng = np.random.default_rng(0)
    for h, w in [(f, 2 * f), (2 * f, f)]:
        image = jnp.asarray(rng.uniform(-1, 1, (2, h, w, 3)), jnp.float32)
        posterior = encode(params, image)
        assert posterior.mean.shape == (2, h // f, w // f, c)
        assert posterior.sample(jax.random.key(1)).shape == posterior.mean.shape
        recon = decode(params, posterior.mode())
        assert recon.shape == image.shape
        assert bool(jnp.all(jnp.isfinite(recon))) and float(recon.std()) > 0
        if name in ("nano", "tiny") and (h, w) == (f, 2 * f):  # without jit once (slow for big configs)
            eager = model.apply(params, posterior.mode(), method=model.decode)
            np.testing.assert_allclose(eager, recon, rtol=1e-4, atol=1e-4)


def test_posterior_sample_and_kl():
    cfg, model, params = _model_and_params("nano")
    image = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    recon, posterior = jax.jit(model.apply)(params, image)
    assert recon.shape == image.shape
    a, b = posterior.sample(jax.random.key(0)), posterior.sample(jax.random.key(1))
    assert not np.allclose(a, b)
    assert bool(jnp.all(posterior.kl() >= 0)) and posterior.kl().shape == (2,)
    np.testing.assert_allclose(posterior.mode(), posterior.mean)


def test_bf16_stays_finite():
    cfg = _cfg("nano", "model.dtype=bfloat16")
    model = vae_lib.build_vae(cfg)
    image = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(0), image)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32  # params stay fp32
    recon, posterior = jax.jit(model.apply)(params, image)
    assert posterior.mean.dtype == jnp.float32  # the posterior is an fp32 island
    assert bool(jnp.all(jnp.isfinite(recon))) and bool(jnp.all(jnp.isfinite(posterior.mean)))


def test_resolution_not_a_multiple_is_a_value_error():
    cfg, model, params = _model_and_params("tiny")
    with pytest.raises(ValueError, match="multiples of 32"):
        model.apply(params, jnp.zeros((1, 48, 64, 3)), method=model.encode)
    with pytest.raises(ValueError, match="3 channels"):
        model.apply(params, jnp.zeros((1, 64, 64, 4)), method=model.encode)
    with pytest.raises(ValueError, match="16 channels"):
        model.apply(params, jnp.zeros((1, 2, 2, 8)), method=model.decode)


# ----------------------------------------------------------------------------- VAE slicing


def test_slice_size_rule_and_the_torch_mirror_agree():
    from microforge_jax import vae_slicing
    from microforge_jax.export import torch_model as tm

    size = vae_slicing.slice_size
    assert size(8, 256 * 256, cpu=True) == 1  # tiny at 256 px: one image per call
    assert size(32, 64 * 64, cpu=True) == 16  # nano at 64 px: 16 images
    assert size(6, 128 * 128, cpu=True) == 3  # the largest divisor of the batch under 4
    assert size(7, 64 * 64, cpu=True) == 7
    assert size(2, 512 * 512, cpu=True) == 1
    assert size(8, 256 * 256, cpu=False) == 8  # accelerators: the whole batch
    assert size(8, 256 * 256, cpu=True, devices=8) == 8  # sharded batches: the whole batch
    for batch in (1, 2, 3, 6, 8, 12, 32, 33):
        for side in (16, 64, 96, 128, 256, 512):
            for cpu in (True, False):
                ours = size(batch, side * side, cpu=cpu)
                assert batch % ours == 0
                assert tm.vae_slice_size(batch, side * side, cpu) == ours, (batch, side, cpu)
    with pytest.raises(ValueError, match="positive"):
        size(0, 16, cpu=True)


def test_sliced_encode_and_decode_equal_the_whole_batch(redraw, relerr):
    cfg, model, params = _model_and_params("nano")
    params = redraw(params, seed=4)
    rng = np.random.default_rng(5)
    image = jnp.asarray(rng.uniform(-1, 1, (4, 16, 24, 3)), jnp.float32)
    z = jnp.asarray(rng.standard_normal((4, 4, 6, cfg.latent_channels)), jnp.float32)
    enc = lambda x: model.apply(params, x, method=model.encode)
    dec = lambda x: model.apply(params, x, method=model.decode)
    whole_post, whole_img = jax.jit(enc)(image), jax.jit(dec)(z)
    assert float(whole_post.mean.std()) > 0 and float(whole_img.std()) > 0
    # images are independent: a different image in row 0 changes row 0 only
    other = jax.jit(dec)(z.at[0].set(-z[0]))
    assert relerr(other[0], whole_img[0]) > 1e-2 and relerr(other[1:], whole_img[1:]) <= 1e-6
    for size in (1, 2):
        post = jax.jit(functools.partial(vae_lib.map_slices, enc, size=size))(image)
        img = jax.jit(functools.partial(vae_lib.map_slices, dec, size=size))(z)
        assert relerr(post.mean, whole_post.mean) <= 1e-5 and relerr(post.logvar, whole_post.logvar) <= 1e-5
        assert relerr(img, whole_img) <= 1e-5
    with pytest.raises(ValueError, match="must divide the batch"):
        vae_lib.map_slices(dec, z, 3)
