"""The backbone and the planner: seed sizes, identity at init, conditioning, editing, sharding."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from microforge_jax import sharding
from microforge_jax.config import ModelConfig, load_config
from microforge_jax.models import backbone as backbone_lib
from microforge_jax.models.denoiser import Text, build_denoiser, task_id

SEED_BACKBONE_PARAMS = {"tiny": 8e6, "small": 29e6, "base": 71e6}
# A small model that still has two AdaLN groups, SharedMQA twice and every branch.
SMALL = (
    "model.backbone.depth=4",
    "model.backbone.dim=64",
    "model.backbone.head_dim=32",
    "model.backbone.shared_attn_every=2",
    "model.backbone.adaln_group_size=2",
    "model.planner.num_tokens=4",
    "model.planner.depth=1",
    "model.latent_channels=4",
    "model.text.embed_dim=48",
)


def _cfg(*overrides, name="nano"):
    return ModelConfig.from_config(load_config(name, SMALL + tuple(overrides)))


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _inputs(cfg, batch=2, h=4, w=4, m=5, seed=0):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.standard_normal((batch, h, w, cfg.latent_channels)), jnp.float32)
    t = jnp.asarray(rng.uniform(0.1, 0.9, batch), jnp.float32)
    mask = np.ones((batch, m), bool)
    mask[-1, 3:] = False  # padding in the last prompt
    text = Text(
        jnp.asarray(rng.standard_normal((batch, m, cfg.text.embed_dim)), jnp.float32),
        jnp.asarray(mask),
        jnp.asarray(rng.standard_normal((batch, cfg.text.embed_dim)), jnp.float32),
    )
    return z, t, text


@pytest.mark.parametrize("name", sorted(SEED_BACKBONE_PARAMS))
def test_parameter_count_matches_seed(name):
    # The seed counts with a 768-wide text input (CLIP-L) and without the text encoder.
    cfg = ModelConfig.from_config(load_config(name, ["model.text.embed_dim=768"]))
    model = build_denoiser(cfg)
    z, t, text = _inputs(cfg, batch=1, h=2, w=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), z, t, text))["params"]
    n = _count(shapes["backbone"])
    assert abs(n / SEED_BACKBONE_PARAMS[name] - 1) <= 0.15, (
        f"{name}: {n / 1e6:.2f}M vs {SEED_BACKBONE_PARAMS[name]:.0f}"
    )
    assert _count(shapes["planner"]) > 0


@pytest.fixture(scope="module")
def model_and_params(redraw):
    cfg = _cfg()
    model = build_denoiser(cfg)
    z, t, text = _inputs(cfg)
    src = jnp.zeros_like(z)
    params = jax.jit(lambda: model.init(jax.random.key(0), z, t, text, source_BxhxwxC=src))()
    apply = jax.jit(model.apply, static_argnames=("method",))
    return cfg, model, params, redraw(params, seed=1), apply


def test_fresh_model_predicts_zero_velocity(model_and_params):
    cfg, model, params, _, apply = model_and_params
    z, t, text = _inputs(cfg)
    v, plan = apply(params, z, t, text)
    assert v.shape == z.shape and plan.shape == (2, cfg.planner.num_tokens, cfg.backbone.dim)
    np.testing.assert_array_equal(v, 0.0)  # zero-initialised output projection


def test_every_block_is_the_identity_at_init():
    """With the gates initialised shut (the base default, DiT-style) every block starts as the identity;
    nano opens the cross-attention gates (`cross_gate_init=1`), so there the text reaches the tokens."""
    cfg = _cfg("model.backbone.cross_gate_init=0")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 16, cfg.backbone.dim)), jnp.float32)
    mod = jnp.asarray(rng.standard_normal((2, backbone_lib.NUM_MOD, cfg.backbone.dim)), jnp.float32) * 0
    ctx = jnp.asarray(rng.standard_normal((2, 6, cfg.backbone.dim)), jnp.float32)
    mask = jnp.ones((2, 6), bool)
    for mixer in ("bissm", "attention"):
        bcfg = dataclasses.replace(cfg.backbone, mixer=mixer)
        block = backbone_lib.HybridBlock(bcfg, layer_index=1)
        params = block.init(jax.random.key(0), x, mod, ctx, mask, (4, 4))
        np.testing.assert_array_equal(block.apply(params, x, mod, ctx, mask, (4, 4)), x)
    shared = backbone_lib.SharedMQA(cfg.backbone)
    np.testing.assert_array_equal(shared.apply(shared.init(jax.random.key(0), x), x), x)
    open_cfg = dataclasses.replace(cfg.backbone, cross_gate_init=1.0)
    block = backbone_lib.HybridBlock(open_cfg, layer_index=1)
    params = block.init(jax.random.key(0), x, mod, ctx, mask, (4, 4))
    assert float(jnp.abs(block.apply(params, x, mod, ctx, mask, (4, 4)) - x).max()) > 1e-3


def test_output_has_spread_and_follows_every_condition(model_and_params):
    cfg, model, _, params, apply = model_and_params
    z, t, text = _inputs(cfg)
    v, plan = apply(params, z, t, text)
    assert float(v.std()) > 1e-3 and bool(jnp.all(jnp.isfinite(v)))
    # text
    _, _, other_text = _inputs(cfg, seed=7)
    v_text, _ = apply(params, z, t, other_text)
    assert float(jnp.abs(v_text - v).max()) > 1e-3
    # the empty prompt differs from the conditional one (what guidance relies on)
    empty = Text(jnp.zeros_like(text.tokens), jnp.zeros_like(text.mask), jnp.zeros_like(text.pooled))
    assert float(jnp.abs(apply(params, z, t, empty)[0] - v).max()) > 1e-3
    # plan tokens, at the backbone directly
    v_plan = apply(params, z, t, text, plan + 1.0, method=model.velocity)
    assert float(jnp.abs(v_plan - apply(params, z, t, text, plan, method=model.velocity)).max()) > 1e-3
    # task
    v_task, _ = apply(params, z, t, text, task_B=jnp.full((2,), task_id("edit")))
    assert float(jnp.abs(v_task - v).max()) > 1e-3
    # time
    assert float(jnp.abs(apply(params, z, t * 0.5, text)[0] - v).max()) > 1e-3


def test_jit_equals_eager(model_and_params, relerr):
    cfg, model, _, params, apply = model_and_params
    z, t, text = _inputs(cfg)
    v_jit, _ = apply(params, z, t, text)
    v_eager, _ = model.apply(params, z, t, text)
    assert relerr(v_eager, v_jit) <= 1e-5


def test_editing_concatenates_a_source_and_predicts_the_target(model_and_params):
    cfg, model, _, params, apply = model_and_params
    z, t, text = _inputs(cfg)
    src_a, src_b = _inputs(cfg, seed=3)[0], _inputs(cfg, seed=4)[0]
    edit = jnp.full((2,), task_id("edit"))
    v_a, _ = apply(params, z, t, text, task_B=edit, source_BxhxwxC=src_a)
    v_b, _ = apply(params, z, t, text, task_B=edit, source_BxhxwxC=src_b)
    assert v_a.shape == z.shape
    assert float(jnp.abs(v_a - v_b).max()) > 1e-3  # the source is seen
    # A non-square latent grid and a different size work too (2-D positions, any grid).
    z2, t2, text2 = _inputs(cfg, h=2, w=6)
    assert apply(params, z2, t2, text2)[0].shape == z2.shape


def test_batch_elements_are_independent(model_and_params):
    cfg, model, _, params, apply = model_and_params
    z, t, text = _inputs(cfg)
    v, plan = apply(params, z, t, text)
    z_changed = z.at[1].set(-z[1])
    v2, plan2 = apply(params, z_changed, t, text)
    np.testing.assert_allclose(v2[0], v[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plan2[0], plan[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(v2[1] - v[1]).max()) > 1e-3


def test_wrong_shapes_say_what_was_expected(model_and_params):
    cfg, model, _, params, _ = model_and_params
    z, t, text = _inputs(cfg)
    with pytest.raises(ValueError, match=r"latent of shape \(batch, h, w, 4\)"):
        model.apply(params, z[..., :3], t, text)
    with pytest.raises(ValueError, match="latent of shape"):
        model.apply(params, z[0], t, text)
    with pytest.raises(ValueError, match="text tokens must have shape"):
        model.apply(params, z, t, text._replace(tokens=text.tokens[..., :5]))
    with pytest.raises(ValueError, match="source latent shape"):
        model.apply(params, z, t, text, source_BxhxwxC=z[:, :2])


@pytest.mark.parametrize(
    "ablation",
    [
        "model.backbone.use_planner=false",  # A1
        "model.backbone.mixer=attention",  # A2
        "model.backbone.use_shared_attn=false",  # A3
        "model.backbone.use_dwconv=false",  # A4
        "model.backbone.adaln=full",  # A6
    ],
)
def test_ablations_build_and_run(ablation, redraw):
    cfg = _cfg(ablation, "model.backbone.depth=2")
    base_cfg = _cfg("model.backbone.depth=2")
    model = build_denoiser(cfg)
    z, t, text = _inputs(cfg)
    params = redraw(model.init(jax.random.key(0), z, t, text), seed=2)
    v, plan = jax.jit(model.apply)(params, z, t, text)
    assert v.shape == z.shape and float(v.std()) > 0
    base_params = jax.eval_shape(lambda: build_denoiser(base_cfg).init(jax.random.key(0), z, t, text))
    assert _count(params) != _count(base_params)  # the switch changes the architecture
    if "use_planner" in ablation:
        assert plan is None and "planner" not in params["params"]


# ----------------------------------------------------------------------------- sharding


def _rule_spec(logical, shape, mesh, rules):
    """The rules applied by hand: each logical axis -> its mesh axis if present and dividing."""
    table = dict(rules)
    out = []
    for name, size in zip(logical, shape):
        axis = table.get(name) if name else None
        if isinstance(axis, tuple):
            axis = tuple(a for a in axis if a in mesh.shape) or None
            axis = axis[0] if axis and len(axis) == 1 else axis
        elif axis is not None and axis not in mesh.shape:
            axis = None
        n = int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis or ())]))
        out.append(axis if axis is not None and size % n == 0 else None)
    return P(*out)


def test_sharded_params_and_forward(model_and_params, relerr):
    cfg, model, _, redrawn, _ = model_and_params
    config = load_config("nano", SMALL + ("sharding.mesh_shape=(4,2,1)",))
    mesh = sharding.mesh_from_config(config.sharding)
    rules = sharding.rules_from_config(config.sharding)
    z, t, text = _inputs(cfg, batch=8)
    init = lambda: model.init(jax.random.key(0), z, t, text, source_BxhxwxC=z)
    params, _ = sharding.init_sharded(init, mesh, rules)
    logical = nn.get_partition_spec(jax.eval_shape(init))
    flat_logical = dict(jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, P))[0])
    n_fsdp = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        expected = _rule_spec(tuple(flat_logical[path]), leaf.shape, mesh, rules)
        assert leaf.sharding.spec == expected, (jax.tree_util.keystr(path), leaf.shape, leaf.sharding.spec)
        n_fsdp += "fsdp" in jax.tree.leaves(tuple(expected))
    assert n_fsdp > 20
    # Spot checks of the rules on named parameters.
    bb = params["params"]["backbone"]
    assert bb["block0"]["mixer"]["in_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert bb["block0"]["ffn"]["fc2"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert params["params"]["planner"]["plan_init"].sharding.spec == P(None, "fsdp")

    # A sharded forward equals the 1-device one (with all parameters redrawn).
    redrawn_sharded = jax.tree.map(lambda x, s: jax.device_put(x, s.sharding), redrawn, params)
    batch = sharding.shard_batch({"z": np.asarray(z), "t": np.asarray(t)}, mesh, rules)
    text_s = Text(*sharding.shard_batch(tuple(np.asarray(x) for x in text), mesh, rules))
    with sharding.use_mesh(mesh, rules):
        v_sharded, plan_sharded = jax.jit(model.apply)(redrawn_sharded, batch["z"], batch["t"], text_s)
    dev = jax.devices()[0]
    v_one, plan_one = jax.jit(model.apply)(jax.device_put(redrawn, dev), *jax.device_put((z, t, text), dev))
    assert float(v_one.std()) > 0
    assert relerr(v_sharded, v_one) <= 1e-5
    assert relerr(plan_sharded, plan_one) <= 1e-5


def test_source_skip_adds_one_zero_initialised_parameter_and_leaves_the_rest_unchanged(model_and_params, redraw):
    """The option must not move any other parameter's initialisation (a named submodule: Flax
    seeds it from its name, not a counter), so a flow stage trains the same model with or without it."""
    cfg, _, p0, _, _ = model_and_params
    skip_cfg = _cfg("model.backbone.source_skip=True")
    model = build_denoiser(skip_cfg)
    z, t, text = _inputs(cfg)
    p1 = jax.jit(lambda: model.init(jax.random.key(0), z, t, text, source_BxhxwxC=jnp.zeros_like(z)))()
    p1 = nn.unbox(p1)
    w = p1["params"]["backbone"]["source_skip"]["kernel"]
    assert w.shape == (cfg.latent_channels * cfg.backbone.patch_size**2, cfg.backbone.dim) and not np.any(w)
    rest = {**p1["params"], "backbone": {k: v for k, v in p1["params"]["backbone"].items() if k != "source_skip"}}
    for a, b in zip(jax.tree.leaves(nn.unbox(p0)["params"]), jax.tree.leaves(rest), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # With a non-zero skip (and no zero gates: every branch contributes) the source reaches the target.
    params = redraw(p1, seed=2)
    apply = jax.jit(
        lambda p, src: model.apply(p, z, t, text, task_B=jnp.full((2,), task_id("edit")), source_BxhxwxC=src)[0]
    )
    src = _inputs(cfg, seed=3)[0]
    v_a = apply(params, src)
    params["params"]["backbone"]["source_skip"]["kernel"] = jnp.zeros_like(w)
    v_b = apply(params, src)
    assert float(jnp.abs(v_a - v_b).max()) > 1e-3


def test_gate_inits_set_the_gates_and_nothing_else(model_and_params):
    """`model.backbone.cross_gate_init` / `shared_gate_init` change those gates' initial values only."""
    cfg, _, p0, _, _ = model_and_params
    model = build_denoiser(_cfg("model.backbone.cross_gate_init=0.5", "model.backbone.shared_gate_init=0.25"))
    z, t, text = _inputs(cfg)
    p1 = nn.unbox(jax.jit(lambda: model.init(jax.random.key(0), z, t, text))())
    flat0 = dict(jax.tree_util.tree_flatten_with_path(nn.unbox(p0))[0])
    flat1 = jax.tree_util.tree_flatten_with_path(p1)[0]
    assert flat0.keys() == dict(flat1).keys()
    gates = {0.5: 0, 0.25: 0}
    for path, leaf in flat1:
        name = jax.tree_util.keystr(path)
        value = 0.5 if "cross_gate" in name else 0.25 if "shared_mqa" in name and name.endswith("['gate']") else None
        if value is not None:
            gates[value] += 1
            np.testing.assert_array_equal(np.asarray(leaf), np.full(leaf.shape, value, np.float32))
            default = cfg.backbone.cross_gate_init if value == 0.5 else cfg.backbone.shared_gate_init
            np.testing.assert_array_equal(np.asarray(flat0[path]), np.full(leaf.shape, default, np.float32))
        else:
            np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat0[path]))
    assert gates == {0.5: cfg.backbone.depth, 0.25: 1}
