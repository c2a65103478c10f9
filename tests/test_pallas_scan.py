"""The fused Pallas scan (interpreted on CPU) against the sequential form, and its Triton lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from microforge_jax.kernels import pallas_scan
from microforge_jax.models import scan as scan_lib

ARGNAMES = "u delta A B C D".split()


def _inputs(bt=2, length=37, din=24, n=4, per_row=False, seed=0):
    """Scan inputs (fp32): L not a multiple of the chunk, Din not a multiple of the block."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((bt, length, din))
    delta = np.log1p(np.exp(rng.standard_normal((bt, length, din)) - 1.0))  # softplus(N(-1, 1)): real decay
    a_shape = (bt, din, n) if per_row else (din, n)
    A = -np.exp(0.5 * rng.standard_normal(a_shape)) * np.arange(1, n + 1)
    B = rng.standard_normal((bt, length, n))
    C = rng.standard_normal((bt, length, n))
    D = rng.standard_normal((bt, din) if per_row else din)
    w = rng.standard_normal((bt, length, din))  # a fixed random cotangent
    return [jnp.asarray(x, jnp.float32) for x in (u, delta, A, B, C, D)], jnp.asarray(w, jnp.float32)


@functools.cache
def _value_and_grad(impl: str):
    def loss(w, *args):
        return jnp.sum(w * jnp.sin(scan_lib.selective_scan(*args, impl=impl).astype(jnp.float32)))

    y = jax.jit(lambda *a: scan_lib.selective_scan(*a, impl=impl))
    return y, jax.jit(jax.grad(loss, argnums=(1, 2, 3, 4, 5, 6)))


def _check(args, w, relerr, tol):
    (y_p, g_p), (y_s, g_s) = [_value_and_grad(impl) for impl in ("pallas", "sequential")]
    y = y_p(*args)
    assert y.dtype == args[0].dtype and y.shape == args[0].shape
    assert relerr(y, y_s(*args)) <= tol
    for name, a, b, x in zip(ARGNAMES, g_p(w, *args), g_s(w, *args), args):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        assert relerr(a, b) <= tol, name


@pytest.mark.parametrize("per_row", [False, True], ids=["shared_A", "per_row_A"])
def test_matches_sequential(per_row, relerr):
    """L = 37 (chunk 8: a padded last chunk), Din = 24 (block 32: padded channels)."""
    args, w = _inputs(per_row=per_row)
    _check(args, w, relerr, 1e-5)


def test_bf16_inputs(relerr):
    """bf16 u, delta, B, C: the kernel converts in registers and computes in fp32, like `sequential`."""
    args, w = _inputs()
    args = [x.astype(jnp.bfloat16) if i in (0, 1, 3, 4) else x for i, x in enumerate(args)]
    # Both forms read the same bf16 values and work in fp32: only the output rounding to bf16 and the
    # order of fp32 sums differ, and the gradients come back rounded to bf16.
    _check(args, w, relerr, 1e-2)


def test_several_blocks_and_padded_state():
    """block_d 8 over Din 24 (3 programs per row), N = 3 (padded to 4), chunk 16 over L = 21."""
    (u, delta, A, B, C, _), w = _inputs(length=21, n=3, seed=3)
    At = jnp.swapaxes(A, 0, 1)[None]
    pallas = functools.partial(pallas_scan.selective_scan_pallas, chunk=16, block_d=8)
    reference = lambda u, d, At, B, C: scan_lib.selective_scan(
        u, d, jnp.swapaxes(At[0], 0, 1), B, C, jnp.zeros(u.shape[-1]), impl="sequential"
    )
    outs = []
    for f in (pallas, reference):
        y, vjp = jax.vjp(jax.jit(f), u, delta, At, B, C)
        outs.append((y, vjp(w)))
    (y_p, g_p), (y_s, g_s) = outs
    np.testing.assert_allclose(y_p, y_s, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(ARGNAMES, g_p, g_s):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_config_accepts_pallas():
    from microforge_jax.config import ModelConfig, load_config  # here: the kernel tests run without ml_collections

    cfg = ModelConfig.from_config(load_config("nano", ["model.backbone.scan_impl=pallas"]))
    assert cfg.backbone.scan_impl == "pallas" and "pallas" in scan_lib.IMPLS


# jaxlib <= 0.10.2 hands XLA the Triton IR; later ones compile it to PTX at lowering time (which
# needs the CUDA plugin's Triton compiler) and emit an FFI call.
TRITON_CALLS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")


def _cuda_export(fn, *avals):
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in TRITON_CALLS]
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*avals)


@pytest.mark.parametrize("dtype, per_row", [(jnp.float32, False), (jnp.bfloat16, True)], ids=["fp32", "bf16_per_row_A"])
def test_kernels_lower_to_triton_for_cuda(dtype, per_row):
    """Runs the Pallas -> Triton IR lowering of both kernels (no GPU needed) at a realistic shape.

    Catches primitives, shapes (Triton's power-of-two tensors) and indexing the Triton backend does
    not support. It does not run Triton's own compiler (TTIR -> PTX): that needs jaxlib's CUDA plugin.
    """
    try:
        _cuda_export(jnp.sin, jax.ShapeDtypeStruct((4,), jnp.float32))
    except Exception as e:  # any failure here means this jaxlib cannot target CUDA
        pytest.skip(f"this jaxlib cannot export for cuda: {e!r}"[:200])
    bt, length, din, n = 64, 256, 768, 16
    row = jax.ShapeDtypeStruct((bt, length, din), dtype)
    proj = jax.ShapeDtypeStruct((bt, length, n), dtype)
    At = jax.ShapeDtypeStruct((bt if per_row else 1, n, din), jnp.float32)
    f = lambda *a: pallas_scan.selective_scan_pallas(*a, interpret=False)
    g = jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(0, 1, 2, 3, 4))
    for fn, calls in ((f, 1), (g, 2)):  # forward; forward (saving states) + backward
        try:
            text = _cuda_export(fn, row, row, At, proj, proj).mlir_module()
        except RuntimeError as e:
            if "Triton compilation handler" not in str(e):
                raise
            pytest.skip(f"this jaxlib compiles Triton IR at lowering time and has no CUDA compiler: {e}")
        assert sum(text.count(f"stablehlo.custom_call @{t}(") for t in TRITON_CALLS) == calls
        assert 'name = "selective_scan_fwd"' in text
