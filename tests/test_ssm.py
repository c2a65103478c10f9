"""Selective scan forms vs a float64 reference, zigzag paths, Mamba parity, BiSSM properties."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microforge_jax.config import BackboneConfig
from microforge_jax.kernels import native_scan
from microforge_jax.models import scan as scan_lib
from microforge_jax.models.ssm import BiSSM, SelectiveSSM, depthwise_conv2d
from microforge_jax.models.zigzag import PATHS, inverse, permute, zigzag_path

FORMS = ("associative", "chunked", "sequential", "native")
LENGTHS = (1, 7, 33, 100)
CHUNK = 16  # below most lengths, so 33 and 100 exercise the padded last chunk


def _cfg(**kw) -> BackboneConfig:
    base = dict(
        depth=1,
        dim=32,
        head_dim=16,
        ffn_expand=3,
        ssm_expand=2,
        ssm_state=16,
        dt_rank=4,
        conv_kernel=3,
        scan_impl="sequential",
        scan_chunk=CHUNK,
        shared_attn_every=3,
        adaln_group_size=3,
        pos_embed="none",
        use_planner=False,
        mixer="bissm",
        use_shared_attn=False,
        use_dwconv=True,
        adaln="group",
        latent_channels=4,
        text_dim=32,
    )
    base.update(kw)
    return BackboneConfig(**base)


def _inputs(length, bt=2, din=12, n=16, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((bt, length, din))
    delta = np.log1p(np.exp(rng.standard_normal((bt, length, din)) - 4.0))  # softplus(N(-4, 1))
    A = -np.exp(np.log(np.tile(np.arange(1, n + 1, dtype=np.float64), (din, 1))) + 0.1 * rng.standard_normal((din, n)))
    B = rng.standard_normal((bt, length, n))
    C = rng.standard_normal((bt, length, n))
    D = rng.standard_normal(din)
    return u, delta, A, B, C, D


def _numpy_scan(u, delta, A, B, C, D):
    """The float64 reference: a plain loop over time."""
    h = np.zeros((u.shape[0], u.shape[2], A.shape[1]))
    ys = []
    for t in range(u.shape[1]):
        h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append(np.einsum("bdn,bn->bd", h, C[:, t]))
    return np.stack(ys, 1) + u * D


def _plain_scan(u, delta, A, B, C, D):
    """Sequential scan with plain autodiff (no custom_vjp): the reference gradient, run in float64."""

    def step(h, x):
        ut, dt, bt, ct = x
        h = jnp.exp(dt[..., None] * A) * h + (dt * ut)[..., None] * bt[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, ct)

    xs = tuple(jnp.swapaxes(x, 0, 1) for x in (u, delta, B, C))
    _, y = jax.lax.scan(step, jnp.zeros((u.shape[0], u.shape[2], A.shape[1]), u.dtype), xs)
    return jnp.swapaxes(y, 0, 1) + u * D


def _loss(f):
    # A fixed random cotangent, so every output element reaches the gradient with its own weight.
    return lambda w, *a: jnp.sum(w * jnp.sin(f(*a)))


@pytest.fixture(scope="module")
def grad_fns():
    return {
        impl: jax.jit(
            jax.grad(
                _loss(lambda *a, impl=impl: scan_lib.selective_scan(*a, impl=impl, chunk=CHUNK)),
                argnums=(1, 2, 3, 4, 5, 6),
            )
        )
        for impl in FORMS
    }


@pytest.fixture(scope="module")
def reference_grads():
    out = {}
    with jax.enable_x64(True):
        g = jax.jit(jax.grad(_loss(_plain_scan), argnums=(1, 2, 3, 4, 5, 6)))
        for length in LENGTHS:
            args = _inputs(length)
            w = np.random.default_rng(1).standard_normal(args[0].shape)
            out[length] = [np.asarray(x) for x in g(jnp.asarray(w), *map(jnp.asarray, args))]
    return out


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("impl", FORMS)
def test_scan_matches_float64(impl, length, relerr, grad_fns, reference_grads):
    args = _inputs(length)
    ref = _numpy_scan(*args)
    y = scan_lib.selective_scan_jit(*(jnp.asarray(a, jnp.float32) for a in args), impl=impl, chunk=CHUNK)
    assert y.dtype == jnp.float32
    assert relerr(y, ref) <= 1e-5
    w = np.random.default_rng(1).standard_normal(args[0].shape).astype(np.float32)
    grads = grad_fns[impl](w, *(jnp.asarray(a, jnp.float32) for a in args))
    for name, g, g_ref in zip("u delta A B C D".split(), grads, reference_grads[length]):
        assert relerr(g, g_ref) <= 1e-5, name


def test_auto_and_per_row_A(relerr):
    """`auto` resolves per backend; a per-batch-row A (both BiSSM directions in one call) is exact."""
    # These tests run on 8 CPU devices, where the (not batch-partitioned) native kernel is not the default.
    assert scan_lib.auto_impl("cpu") == "sequential" and scan_lib.auto_impl("tpu") == "associative"
    assert scan_lib.auto_impl("gpu") == "pallas"  # the fused kernel (jax 0.10-0.11 have the Triton backend)
    a1, a2 = _inputs(33, seed=1), _inputs(33, seed=2)
    both = [np.concatenate([x, y], 0) for x, y in zip(a1, a2)]
    A2 = np.repeat(np.stack([a1[2], a2[2]]), 2, axis=0)
    D2 = np.repeat(np.stack([a1[5], a2[5]]), 2, axis=0)
    y = scan_lib.selective_scan_jit(*(jnp.asarray(a, jnp.float32) for a in (*both[:2], A2, *both[3:5], D2)))
    assert relerr(y, np.concatenate([_numpy_scan(*a1), _numpy_scan(*a2)], 0)) <= 1e-5
    with pytest.raises(ValueError, match="unknown scan impl"):
        scan_lib.selective_scan(*map(jnp.asarray, a1), impl="fast")


def test_bf16_stays_close_to_fp32(relerr):
    args = [jnp.asarray(a, jnp.float32) for a in _inputs(100)]
    y32 = scan_lib.selective_scan_jit(*args)
    bf = [a.astype(jnp.bfloat16) if i in (0, 3, 4) else a for i, a in enumerate(args)]
    for impl in FORMS:
        y16 = scan_lib.selective_scan_jit(*bf, impl=impl, chunk=CHUNK)
        assert y16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y16)))
        assert relerr(y16, y32) <= 2e-2
    # delta in bf16 too: exp(delta * A) is still formed in fp32, so the slow decays survive.
    tiny = jnp.full_like(args[1], 1e-3).astype(jnp.bfloat16)
    y = scan_lib.selective_scan_jit(bf[0], tiny, *bf[2:])
    assert relerr(y, _numpy_scan(*(np.asarray(a, np.float64) for a in (bf[0], tiny, *bf[2:])))) <= 2e-2


def _native_vs_sequential(args, chunk):
    """y and the five input gradients of the native kernel (per-row A, given chunk) and of lax.scan."""
    u, delta, A, B, C = args
    w = jnp.asarray(np.random.default_rng(5).standard_normal(u.shape), jnp.float32)

    def native(u, delta, At, B, C):
        return native_scan.selective_scan_native(u, delta, At, B, C, chunk=chunk)

    def sequential(u, delta, At, B, C):
        tr = lambda x: jnp.swapaxes(x, 0, 1)
        return tr(scan_lib._sequential(tr(u), tr(delta), At, tr(B), tr(C)))

    out = []
    for f in (native, sequential):
        y, vjp = jax.vjp(jax.jit(f), u, delta, A, B, C)
        out.append((y, vjp(w)))
    return out


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_native_kernel_chunks_rows_and_threads(chunk, relerr, monkeypatch):
    """The C++ kernel against lax.scan: per-row A, chunk boundaries anywhere, rows split over threads."""
    rng = np.random.default_rng(chunk)
    bt, length, din, n = 3, 100, 20, 5
    u, delta, _, B, C, _ = _inputs(length, bt=bt, din=din, n=n, seed=chunk)
    A = -np.exp(rng.standard_normal((bt, n, din)))  # (Bt, N, Din): each row its own decays
    args = [jnp.asarray(x, jnp.float32) for x in (u, delta, A, B, C)]
    for threads in ("1", "2"):
        monkeypatch.setenv("MICROFORGE_SCAN_THREADS", threads)
        (y, grads), (y_ref, grads_ref) = _native_vs_sequential(args, chunk)
        assert float(jnp.std(y_ref)) > 0 and relerr(y, y_ref) <= 1e-6
        for name, g, g_ref in zip("u delta At B C".split(), grads, grads_ref):
            assert float(jnp.std(g_ref)) > 0 and relerr(g, g_ref) <= 1e-5, (name, threads)


def test_native_kernel_on_a_sharded_batch(relerr):
    """Batch-sharded over the 8 test devices (XLA gathers it for the custom call): same y and gradients."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    u, delta, A, B, C, D = (jnp.asarray(x, jnp.float32) for x in _inputs(33, bt=8, din=12))
    loss = lambda impl: lambda u, d, B, C: jnp.sum(jnp.sin(scan_lib.selective_scan(u, d, A, B, C, D, impl=impl)))
    grad = lambda impl: jax.jit(jax.value_and_grad(loss(impl), argnums=(0, 1, 2, 3)))
    sharded = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    v, g = grad("native")(*(jax.device_put(x, sharded) for x in (u, delta, B, C)))
    v_ref, g_ref = grad("sequential")(u, delta, B, C)
    assert abs(float(v) - float(v_ref)) <= 1e-5 * abs(float(v_ref))
    for a, b in zip(g, g_ref):
        assert relerr(a, b) <= 1e-5


def test_native_kernel_is_cpu_only(monkeypatch):
    args = [jnp.asarray(a, jnp.float32) for a in _inputs(7)]
    monkeypatch.setattr(scan_lib.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="'native' is the CPU kernel; on gpu use 'auto'"):
        scan_lib.selective_scan(*args, impl="native")


def test_native_kernel_build_and_fallback(tmp_path, monkeypatch):
    """A missing or failing compiler is a NativeScanError saying which; `auto` then keeps lax.scan."""
    monkeypatch.setenv("MICROFORGE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native_scan.NativeScanError, match="not an executable"):
        native_scan.build()
    monkeypatch.setenv("CXX", "false")  # runs, exits 1
    with pytest.raises(native_scan.NativeScanError, match="failed"):
        native_scan.build()
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left behind
    # On one CPU device `auto` is the kernel where it builds, lax.scan (with one warning) where not.
    code = "from microforge_jax.models import scan; print(scan.auto_impl('cpu'))"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CXX")}
    env["MICROFORGE_KERNEL_CACHE"] = str(tmp_path / "cache")
    root = str(Path(__file__).resolve().parent.parent)
    run = lambda **kw: subprocess.run(
        [sys.executable, "-c", code], env={**env, **kw}, cwd=root, capture_output=True, text=True, timeout=300
    )
    good, bad = run(), run(CXX="false", MICROFORGE_KERNEL_CACHE=str(tmp_path / "other"))
    assert good.returncode == 0 and good.stdout.split() == ["native"], good.stderr
    assert bad.returncode == 0 and bad.stdout.split() == ["sequential"], bad.stderr
    assert "native CPU scan unavailable" in bad.stderr and "failed" in bad.stderr
    assert len(list((tmp_path / "cache").glob("native_scan_*.so"))) == 1


@pytest.mark.parametrize("hw", [(8, 8), (5, 7), (8, 16), (1, 6), (3, 1)])
def test_zigzag_paths_are_bijections(hw):
    h, w = hw
    x = np.arange(h * w) * 10
    paths = [zigzag_path(h, w, i) for i in range(2 * len(PATHS))]
    for i, p in enumerate(paths):
        assert sorted(p) == list(range(h * w))
        np.testing.assert_array_equal(x[p][inverse(p)], x)
        # A snake: consecutive tokens along the path are grid neighbours.
        r, c = np.divmod(p, w)
        assert np.all(np.abs(np.diff(r)) + np.abs(np.diff(c)) == 1) or h * w == 1
        np.testing.assert_array_equal(p, paths[i % len(PATHS)])
    if min(h, w) > 1:
        for i in range(len(paths) - 1):
            assert not np.array_equal(paths[i], paths[i + 1])
        assert len({p.tobytes() for p in paths}) == len(PATHS)


def test_mamba_parity_with_transformers(relerr):
    import torch
    from transformers import MambaConfig
    from transformers.models.mamba import modeling_mamba as modeling

    torch.manual_seed(0)
    tcfg = MambaConfig(
        hidden_size=32,
        state_size=16,
        expand=2,
        conv_kernel=4,
        time_step_rank=4,
        use_conv_bias=True,
        use_bias=False,
        use_mambapy=False,
        num_hidden_layers=1,
    )
    mixer = modeling.MambaMixer(tcfg, layer_idx=0).eval()
    with torch.no_grad():  # redraw every weight so nothing is at a degenerate init
        for name, p in mixer.named_parameters():
            if name == "A_log":
                p.add_(0.3 * torch.randn_like(p))
            elif name != "dt_proj.bias":
                p.copy_(torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)
    x = np.random.default_rng(0).standard_normal((2, 37, 32)).astype(np.float32)
    with torch.no_grad():
        ref = mixer(torch.from_numpy(x)).numpy()

    sd = {k: v.detach().numpy() for k, v in mixer.state_dict().items()}
    params = {
        "in_proj": {"kernel": sd["in_proj.weight"].T},
        "conv1d": {"kernel": sd["conv1d.weight"].transpose(2, 1, 0), "bias": sd["conv1d.bias"]},  # (Din,1,K)->(K,1,Din)
        "x_proj": {"kernel": sd["x_proj.weight"].T},
        "dt_proj": {"kernel": sd["dt_proj.weight"].T, "bias": sd["dt_proj.bias"]},
        "A_log": sd["A_log"],
        "D": sd["D"],
        "out_proj": {"kernel": sd["out_proj.weight"].T},
    }
    module = SelectiveSSM(_cfg(dim=32, dt_rank=4))
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(lambda s: s.shape, abstract)
    assert np.std(ref) > 0
    for impl in FORMS:
        y = SelectiveSSM(_cfg(dim=32, dt_rank=4, scan_impl=impl)).apply({"params": params}, x)
        assert relerr(y, ref) <= 1e-5, impl


@pytest.fixture(scope="module")
def bissm():
    """A BiSSM (layer 1: a column snake) with every parameter redrawn, and its jitted apply."""
    from conftest import redraw_params

    module = BiSSM(_cfg(), layer_index=1)
    x = jnp.zeros((2, 64, 32))
    params = redraw_params(module.init(jax.random.key(0), x, (8, 8))["params"], seed=3)
    apply = jax.jit(module.apply, static_argnums=2)
    return module, params, apply


def test_bissm_param_names_and_axes():
    module = BiSSM(_cfg(), layer_index=0)
    boxed = jax.eval_shape(lambda k, x: module.init(k, x, (8, 8)), jax.random.key(0), jnp.zeros((1, 64, 32)))["params"]
    names = jax.tree_util.tree_map(lambda p: p.names, boxed, is_leaf=lambda p: hasattr(p, "names"))
    shapes = jax.tree_util.tree_map(lambda p: p.value.shape, boxed, is_leaf=lambda p: hasattr(p, "names"))
    expected = {"in_proj": {"kernel": (32, 128)}, "out_proj": {"kernel": (64, 32)}}
    for d in ("fwd_", "bwd_"):
        expected |= {
            f"{d}conv": {"kernel": (3, 3, 1, 64), "bias": (64,)},
            f"{d}x_proj": {"kernel": (64, 4 + 32)},
            f"{d}dt_proj": {"kernel": (4, 64), "bias": (64,)},
            f"{d}A_log": (64, 16),
            f"{d}D": (64,),
        }
    assert shapes == expected
    assert names["in_proj"]["kernel"] == ("embed", "mlp") and names["fwd_A_log"] == ("mlp", "state")
    assert all(isinstance(n, tuple) for n in jax.tree_util.tree_leaves(names, is_leaf=lambda n: isinstance(n, tuple)))
    fresh = module.init(jax.random.key(0), jnp.zeros((1, 64, 32)), (8, 8))["params"]
    bias = jax.nn.softplus(fresh["fwd_dt_proj"]["bias"].value)
    assert 1e-3 <= float(bias.min()) and float(bias.max()) <= 1e-1
    np.testing.assert_allclose(np.exp(fresh["bwd_A_log"].value[5]), np.arange(1, 17), rtol=1e-6)
    no_conv = BiSSM(_cfg(use_dwconv=False)).init(jax.random.key(0), jnp.zeros((1, 64, 32)), (8, 8))["params"]
    assert "fwd_conv" not in no_conv and "bwd_conv" not in no_conv


def test_bissm_properties(bissm, relerr):
    module, params, apply = bissm
    x = jax.random.normal(jax.random.key(1), (2, 64, 32))
    y = apply({"params": params}, x, (8, 8))
    assert y.shape == x.shape and float(jnp.std(y)) > 0
    assert relerr(module.apply({"params": params}, x, (8, 8)), y) <= 1e-6  # jit == no jit
    # Both directions contribute: silencing one (no B/C input, D = 0) changes the output.
    for d in ("fwd_", "bwd_"):
        off = dict(params)
        off[f"{d}x_proj"] = {"kernel": jnp.zeros_like(params[f"{d}x_proj"]["kernel"])}
        off[f"{d}D"] = jnp.zeros_like(params[f"{d}D"])
        assert relerr(apply({"params": off}, x, (8, 8)), y) > 1e-2, d
    # Not a per-token function: permuting the tokens does not just permute the output.
    p = np.random.default_rng(0).permutation(64)
    assert relerr(apply({"params": params}, x[:, p], (8, 8)), y[:, p]) > 1e-2


def test_bissm_editing_grid_and_scan_forms(bissm, relerr):
    module, params, apply = bissm
    x = jax.random.normal(jax.random.key(2), (2, 128, 32))
    y = apply({"params": params}, x, (8, 16))
    assert y.shape == (2, 128, 32) and float(jnp.std(y)) > 0
    y_chunked = BiSSM(_cfg(scan_impl="chunked"), layer_index=1).apply({"params": params}, x, (8, 16))
    assert relerr(y_chunked, y) <= 1e-5
    with pytest.raises(ValueError, match="grid"):
        module.apply({"params": params}, x, (8, 8))


def test_bissm_bf16(bissm, relerr):
    module, params, apply = bissm
    x = jax.random.normal(jax.random.key(3), (2, 64, 32))
    y32 = apply({"params": params}, x, (8, 8))
    y16 = dataclasses.replace(module, dtype=jnp.bfloat16).apply({"params": params}, x.astype(jnp.bfloat16), (8, 8))
    assert y16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y16)))
    assert relerr(y16, y32) <= 5e-2


@pytest.mark.parametrize("path", ["zigzag", "random"])
def test_permute_grad_is_the_gather_grad(path, relerr):
    """`permute` (custom VJP: the backward is the inverse gather) == autodiff of `x[:, path]`."""
    rng = np.random.default_rng(0)
    p = zigzag_path(8, 16, 3) if path == "zigzag" else rng.permutation(128).astype(np.int32)
    x = jnp.asarray(rng.standard_normal((3, 128, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 128, 5)), jnp.float32)
    np.testing.assert_array_equal(permute(x, p), x[:, p])
    np.testing.assert_array_equal(permute(jnp.swapaxes(x, 0, 1), p, axis=0), jnp.swapaxes(x, 0, 1)[p])
    g = jax.grad(lambda x: jnp.sum(w * jnp.sin(permute(x, p))))(x)
    g_ref = jax.grad(lambda x: jnp.sum(w * jnp.sin(x[:, p])))(x)
    assert float(jnp.std(g_ref)) > 0 and relerr(g, g_ref) <= 1e-5


@pytest.mark.parametrize("k, hw", [(3, (8, 16)), (3, (5, 7)), (4, (6, 5)), (1, (3, 4)), (3, (1, 6))])
def test_depthwise_conv2d_equals_grouped_nn_conv(k, hw, relerr):
    """The shifted-add depthwise conv == `nn.Conv(feature_group_count=E)` (SAME), outputs and gradients."""
    rng = np.random.default_rng(k)
    e, d = 6, 2
    x = jnp.asarray(rng.standard_normal((2, *hw, e)), jnp.float32)
    kernels = jnp.asarray(rng.standard_normal((d, k, k, e)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, 2, *hw, e)), jnp.float32)
    conv = nn.Conv(e, (k, k), feature_group_count=e, use_bias=False)

    def ref(x, kernels):
        return jnp.stack([conv.apply({"params": {"kernel": kernels[i][:, :, None, :]}}, x) for i in range(d)])

    y, y_ref = depthwise_conv2d(x, kernels), ref(x, kernels)
    assert y.shape == (d, 2, *hw, e) and float(jnp.std(y_ref)) > 0
    assert relerr(y, y_ref) <= 1e-5
    loss = lambda f: lambda x, kk: jnp.sum(w * jnp.sin(f(x, kk)))
    grads = jax.grad(loss(depthwise_conv2d), argnums=(0, 1))(x, kernels)
    grads_ref = jax.grad(loss(ref), argnums=(0, 1))(x, kernels)
    for name, g, g_ref in zip(("x", "kernel"), grads, grads_ref):
        assert relerr(g, g_ref) <= 1e-5, name


@pytest.mark.parametrize("layer_index", [0, 1, 3])
@pytest.mark.parametrize("use_dwconv", [True, False])
def test_bissm_fast_graph_equals_reference_graph(layer_index, use_dwconv, relerr):
    """The CPU graph (one shifted-add conv call, one permute) == the reference graph (grouped
    `nn.Conv`s, two gathers): same parameter tree and init, same outputs and gradients."""
    from conftest import redraw_params

    cfg = _cfg(use_dwconv=use_dwconv)
    fast, ref = BiSSM(cfg, layer_index=layer_index), BiSSM(cfg, layer_index=layer_index, reference_graph=True)
    x = jax.random.normal(jax.random.key(1), (2, 128, 32))
    p_fast = fast.init(jax.random.key(0), x, (8, 16))["params"]
    p_ref = ref.init(jax.random.key(0), x, (8, 16))["params"]
    is_leaf = lambda p: hasattr(p, "names")
    assert jax.tree_util.tree_structure(p_fast, is_leaf=is_leaf) == jax.tree_util.tree_structure(p_ref, is_leaf=is_leaf)
    for a, b in zip(
        jax.tree_util.tree_leaves(p_fast, is_leaf=is_leaf), jax.tree_util.tree_leaves(p_ref, is_leaf=is_leaf)
    ):
        assert a.names == b.names
        np.testing.assert_array_equal(a.value, b.value)
    params = redraw_params(p_fast, seed=4)
    w = jax.random.normal(jax.random.key(5), x.shape)
    loss = lambda m: lambda p, x: jnp.sum(w * jnp.sin(m.apply({"params": p}, x, (8, 16))))
    y, y_ref = fast.apply({"params": params}, x, (8, 16)), ref.apply({"params": params}, x, (8, 16))
    assert float(jnp.std(y_ref)) > 0 and relerr(y, y_ref) <= 1e-5
    grads = jax.grad(loss(fast), argnums=(0, 1))(params, x)
    grads_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    flat = jax.tree_util.tree_leaves_with_path(grads_ref)
    for (path, g_ref), g in zip(flat, jax.tree_util.tree_leaves(grads)):
        assert float(jnp.linalg.norm(g_ref)) > 0, path
        assert relerr(g, g_ref) <= 1e-5, path
