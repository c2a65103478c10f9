"""Sharding on 8 fake CPU devices: meshes, rules, shape-first sharded init, sharded forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from microforge_jax import sharding
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models import vae as vae_lib


def test_eight_fake_devices():
    assert jax.device_count() == 8


def test_mesh_from_config_fills_minus_one():
    config = load_config("nano", ["sharding.mesh_shape=(-1,2,1)"])
    mesh = sharding.mesh_from_config(config.sharding)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh(("data", "fsdp"), (3, 2))
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh(("data", "fsdp"), (-1, -1))


def test_rules_reject_unknown_logical_axes():
    config = load_config("nano", ["sharding.rules=(('embedd', 'fsdp'),)"])
    with pytest.raises(ValueError, match="unknown logical axis 'embedd'"):
        sharding.rules_from_config(config.sharding)


def test_mesh_spec_replicates_undivisible_dims():
    mesh = sharding.make_mesh(("data", "fsdp"), (4, 2))
    rules = (("conv_out", "fsdp"), ("embed", "fsdp"), ("mlp", "tensor"))
    assert sharding.mesh_spec(("conv_h", "conv_w", "conv_in", "conv_out"), (3, 3, 3, 32), mesh, rules) == P(
        None, None, None, "fsdp"
    )
    assert sharding.mesh_spec(("conv_in", "conv_out"), (4, 3), mesh, rules) == P(None, None)
    # "tensor" is not in this mesh: dropped rather than an error.
    assert sharding.mesh_spec(("embed", "mlp"), (8, 8), mesh, rules) == P("fsdp", None)


@pytest.fixture(scope="module")
def nano_vae():
    config = load_config("nano", ["sharding.mesh_shape=(4,2,1)"])
    cfg = ModelConfig.from_config(config)
    mesh = sharding.mesh_from_config(config.sharding)
    rules = sharding.rules_from_config(config.sharding)
    model = vae_lib.build_vae(cfg)
    example = jnp.zeros((1, 16, 16, 3))
    params, shardings = sharding.init_sharded(lambda: model.init(jax.random.key(0), example), mesh, rules)
    return model, mesh, rules, params, shardings


def _expected_spec(path, shape):
    """What the default rules say, derived from the parameter's own name: an independent check."""
    name = path[-1]
    if name == "kernel":  # conv kernels (H, W, I, O): O over fsdp (2) when divisible
        return P(None, None, None, "fsdp" if shape[-1] % 2 == 0 else None)
    if name == "bias" and not any("norm" in p for p in path):  # conv bias: O over fsdp
        return P("fsdp" if shape[0] % 2 == 0 else None)
    return P(None)  # GroupNorm scale/bias: replicated


def test_vae_params_land_on_expected_shardings(nano_vae):
    model, mesh, rules, params, shardings = nano_vae
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    assert len(flat) > 20
    sharded = 0
    for path, leaf in flat:
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        expected = _expected_spec(keys, leaf.shape)
        assert leaf.sharding.mesh.shape == mesh.shape, keys
        assert leaf.sharding.spec == expected, (keys, leaf.shape, leaf.sharding.spec, expected)
        sharded += "fsdp" in expected
        # Each device holds only its shard.
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        assert shard_shape[-1] == (leaf.shape[-1] // 2 if "fsdp" in expected else leaf.shape[-1])
    assert sharded > 10


def test_sharded_forward_equals_single_device(nano_vae, relerr):
    model, mesh, rules, params, _ = nano_vae
    image = np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)
    batch = sharding.shard_batch(image, mesh, rules)
    assert batch.sharding.spec == P(("data", "fsdp"), None, None, None)
    with sharding.use_mesh(mesh, rules):
        recon_sharded, post_sharded = jax.jit(model.apply)(params, batch)
    assert recon_sharded.sharding.spec[0] is not None  # the batch stays split across devices
    device = jax.devices()[0]
    params_1 = jax.device_put(params, device)
    recon_1, post_1 = jax.jit(model.apply)(params_1, jax.device_put(image, device))
    assert float(jnp.std(recon_1)) > 0
    assert relerr(recon_sharded, recon_1) <= 1e-5
    assert relerr(post_sharded.mean, post_1.mean) <= 1e-5


def test_shard_batch_rejects_undivisible_batch(nano_vae):
    _, mesh, rules, _, _ = nano_vae
    with pytest.raises(ValueError, match="does not split over 8"):
        sharding.shard_batch(np.zeros((6, 4)), mesh, rules)
