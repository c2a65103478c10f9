"""The selective scan as one fused Pallas kernel per pass (Triton on GPU, the interpreter on CPU).

The "associative" form materialises the (Bt, L, N, Din) decays, inputs and states in both passes:
on an H100 that traffic is about half of every training step. Here each program owns one batch row
and one block of `block_d` channels, keeps its (N, block_d) state in registers and walks the L
tokens in order, so the only memory traffic is reading u, delta, B, C (and dy) once and writing y
(and the gradients) once; nothing of size L x D x N exists in either pass.

    grid (Bt, Din / block_d); per program: h (N, block_d) fp32, loop over L / chunk chunks, each
    chunk a static unroll of `chunk` steps (Triton has no dynamic indexing of registers and no
    unrolled `fori_loop`, so the unroll is a Python loop; its loads do not depend on the state and
    are issued together at the chunk start).

Backward: the forward run under `jax.grad` also writes the state entering every chunk,
(Bt, L / chunk, N, Din) = 1 / chunk of the state history. The backward kernel walks the chunks in
reverse; per chunk it reloads the saved start state, recomputes the chunk's `chunk` states forward
(kept as separate register values: the unrolled loop makes every index static), then runs the
adjoint lam_t = g_t C_t + a_{t+1} lam_{t+1} backwards over them. h_{t-1} is never recovered from
h_t by dividing by a_t: a_t underflows to 0 for fast decays. dA is accumulated per program and
written once; dB and dC are sums over Din, so each program writes its block's partial sum per token,
(Bt, Din / block_d, L, N), and XLA adds the partials outside the kernel.

Padding: L up to a multiple of `chunk` with delta = 0 (a = 1, b = 0: padded steps come after the
real ones and change nothing), N to a power of two and Din to a multiple of `block_d` with zeros
(a zero B, C, u, delta row or A column leaves a zero state there). Triton tensors must have
power-of-two sizes, hence `block_d` and the padded N are powers of two.

Inputs stay in their own dtype (bf16 halves the reads); every value is converted to fp32 in
registers and all maths, the state and the outputs are fp32, as in the other forms.

Triton, not Mosaic GPU: in jax 0.10.2 and 0.11.2 `pallas_call` lowers to Mosaic GPU on GPU unless it
is given Triton compiler params, so they are always passed. jax 0.11.2 warns that the Pallas Triton
backend is deprecated (to be removed in a later version; the way on is Mosaic GPU or jax_triton).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # the Triton params select the Triton lowering (see the module docstring)
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - a jax without the Triton Pallas backend
    _pltriton = None

# Defaults from `python scripts/pallas_check.py --sweep` (H200, jax 0.11.2, Bt=64, L=256, Din=768, N=16,
# fp32; fwd / fwd+bwd ms): chunk 8, block 32, 2 warps 0.45 / 1.43; chunk 16, block 32, 4 warps 0.74 / 2.40;
# chunk 32 1.01 / 6.45 (likely spilling the backward's `chunk` register-held states); chunk 4 0.56 / 1.48.
CHUNK = 8  # steps between saved states: the backward holds `chunk` states in registers, memory L / chunk
BLOCK_D = 32  # channels per program: the state tile is (N, BLOCK_D)
NUM_WARPS = 2  # 64 threads over a (16, 32) tile: 8 values of each state per thread


class _Cfg(NamedTuple):
    chunk: int
    block_d: int
    num_warps: int
    num_stages: int | None
    interpret: bool


def triton_available() -> bool:
    """Whether this JAX can lower the kernels with Triton (jax 0.11 warns the backend is deprecated)."""
    return getattr(_pltriton, "CompilerParams", None) is not None


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _compiler_params(cfg: _Cfg):
    cls = getattr(_pltriton, "CompilerParams", None)
    return None if cls is None or cfg.interpret else cls(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def selective_scan_pallas(
    u_BxLxD: jax.Array,
    delta_BxLxD: jax.Array,
    At_AxNxD: jax.Array,
    B_BxLxN: jax.Array,
    C_BxLxN: jax.Array,
    *,
    chunk: int = CHUNK,
    block_d: int = BLOCK_D,
    num_warps: int = NUM_WARPS,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """sum_n h_t C_t of the Mamba-1 scan from a zero state (the D u skip is added by the caller).

    Args:
      u_BxLxD, delta_BxLxD: (Bt, L, Din) input and step sizes, any float dtype.
      At_AxNxD: (Ba, N, Din) decay rates A transposed, Ba in {1, Bt} (fp32).
      B_BxLxN, C_BxLxN: (Bt, L, N) input and output projections, any float dtype.
      chunk: steps per unrolled chunk and between the states saved for the backward.
      block_d: channels per program, rounded down to a power of two (and to Din's next power of 2).
      num_warps, num_stages: Triton compiler params (None: Pallas' default stages).
      interpret: run the Pallas interpreter instead of Triton; default: on the CPU backend only.

    Returns:
      y: (Bt, L, Din) fp32.
    """
    bt, length, din = u_BxLxD.shape
    n = At_AxNxD.shape[1]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    chunk = max(1, min(chunk, length))
    bd = min(_next_pow2(block_d + 1) // 2, _next_pow2(din))
    cfg = _Cfg(chunk, bd, num_warps, num_stages, bool(interpret))
    pad_l, pad_n, pad_d = -length % chunk, _next_pow2(n) - n, -din % bd

    def pad(x, *widths):
        return jnp.pad(x, [(0, 0), *widths]) if any(w[1] for w in widths) else x

    u, d = (pad(x, (0, pad_l), (0, pad_d)) for x in (u_BxLxD, delta_BxLxD))
    B, C = (pad(x, (0, pad_l), (0, pad_n)) for x in (B_BxLxN, C_BxLxN))
    At = pad(At_AxNxD.astype(jnp.float32), (0, pad_n), (0, pad_d))
    y = _scan(u, d, At, B, C, cfg)
    return y[:, :length, :din]


# ----------------------------------------------------------------------------- kernels
# Refs are blocks of one batch row: u, delta, y, g, du, ddelta (1, L, bd); At, dA (1, N, bd);
# B, C (1, L, N); saved states (1, L / chunk, N, bd); dB, dC partials (1, 1, L, N).


def _load_step(refs, t):
    """One token's u, delta (bd,) and B, C (N,) in fp32 (and g (bd,) when five refs are given)."""
    return [r[0, t, :].astype(jnp.float32) for r in refs]


def _forward_kernel(u_ref, d_ref, at_ref, b_ref, c_ref, y_ref, *h_ref, chunk: int):
    At = at_ref[0, :, :]
    n_chunks = u_ref.shape[1] // chunk

    def body(c, h):
        if h_ref:  # the state entering the chunk, for the backward
            h_ref[0][0, c, :, :] = h
        t0 = c * chunk
        steps = [_load_step((u_ref, d_ref, b_ref, c_ref), t0 + k) for k in range(chunk)]
        for k, (u, d, b, cc) in enumerate(steps):
            h = jnp.exp(d[None, :] * At) * h + (d * u)[None, :] * b[:, None]
            y_ref[0, t0 + k, :] = jnp.sum(h * cc[:, None], axis=0)
        return h

    lax.fori_loop(0, n_chunks, body, jnp.zeros(At.shape, jnp.float32))


def _backward_kernel(
    u_ref, d_ref, at_ref, b_ref, c_ref, g_ref, h_ref, du_ref, dd_ref, da_ref, db_ref, dc_ref, *, chunk: int
):
    At = at_ref[0, :, :]
    n_chunks = u_ref.shape[1] // chunk

    def body(i, carry):
        lam_next, dA = carry  # lam_next = a_{t+1} lam_{t+1}, flowing back from the next chunk
        c = n_chunks - 1 - i
        t0 = c * chunk
        steps = [_load_step((u_ref, d_ref, b_ref, c_ref, g_ref), t0 + k) for k in range(chunk)]
        # Recompute the chunk's states from its saved start; hs[k] = h_{t0+k-1}, hs[k+1] = h_{t0+k}.
        hs = [h_ref[0, c, :, :]]
        for u, d, b, _, _ in steps:
            hs.append(jnp.exp(d[None, :] * At) * hs[-1] + (d * u)[None, :] * b[:, None])
        for k in reversed(range(chunk)):
            u, d, b, cc, g = steps[k]
            t = t0 + k
            a = jnp.exp(d[None, :] * At)  # recomputed: holding `chunk` decays too would double the registers
            lam = g[None, :] * cc[:, None] + lam_next
            s = jnp.sum(lam * b[:, None], axis=0)  # (bd,)
            q = lam * hs[k] * a
            du_ref[0, t, :] = s * d
            dd_ref[0, t, :] = s * u + jnp.sum(q * At, axis=0)
            db_ref[0, 0, t, :] = jnp.sum(lam * (d * u)[None, :], axis=1)  # this block's part of the sum over Din
            dc_ref[0, 0, t, :] = jnp.sum(hs[k + 1] * g[None, :], axis=1)
            dA = dA + q * d[None, :]
            lam_next = a * lam
        return lam_next, dA

    zeros = jnp.zeros(At.shape, jnp.float32)
    _, dA = lax.fori_loop(0, n_chunks, body, (zeros, zeros))
    da_ref[0, :, :] = dA


# ----------------------------------------------------------------------------- pallas_calls


def _specs(u, At, B, bd: int):
    """BlockSpecs of u/delta, At, B/C for the (Bt, Din / bd) grid."""
    length, n = u.shape[1], At.shape[1]
    row = pl.BlockSpec((1, length, bd), lambda b, j: (b, 0, j))
    per_row = At.shape[0] != 1
    a_spec = pl.BlockSpec((1, n, bd), (lambda b, j: (b, 0, j)) if per_row else (lambda b, j: (0, 0, j)))
    bc = pl.BlockSpec((1, length, n), lambda b, j: (b, 0, 0))
    return row, a_spec, bc


def _forward_call(u, d, At, B, C, cfg: _Cfg, save_states: bool):
    bt, length, din = u.shape
    n, bd = At.shape[1], cfg.block_d
    row, a_spec, bc = _specs(u, At, B, bd)
    out_shape = [jax.ShapeDtypeStruct((bt, length, din), jnp.float32)]
    out_specs = [row]
    if save_states:
        n_chunks = length // cfg.chunk
        out_shape.append(jax.ShapeDtypeStruct((bt, n_chunks, n, din), jnp.float32))
        out_specs.append(pl.BlockSpec((1, n_chunks, n, bd), lambda b, j: (b, 0, 0, j)))
    out = pl.pallas_call(
        functools.partial(_forward_kernel, chunk=cfg.chunk),
        out_shape=out_shape,
        grid=(bt, din // bd),
        in_specs=[row, row, a_spec, bc, bc],
        out_specs=out_specs,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="selective_scan_fwd",
    )(u, d, At, B, C)
    return out if save_states else out[0]


def _backward_call(u, d, At, B, C, g, states, cfg: _Cfg):
    bt, length, din = u.shape
    n, bd = At.shape[1], cfg.block_d
    n_blocks = din // bd
    row, a_spec, bc = _specs(u, At, B, bd)
    part = pl.BlockSpec((1, 1, length, n), lambda b, j: (b, j, 0, 0))
    saved = pl.BlockSpec((1, length // cfg.chunk, n, bd), lambda b, j: (b, 0, 0, j))
    f32 = jnp.float32
    du, dd, dA, dB, dC = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=cfg.chunk),
        out_shape=[
            jax.ShapeDtypeStruct((bt, length, din), f32),
            jax.ShapeDtypeStruct((bt, length, din), f32),
            jax.ShapeDtypeStruct((bt, n, din), f32),
            jax.ShapeDtypeStruct((bt, n_blocks, length, n), f32),
            jax.ShapeDtypeStruct((bt, n_blocks, length, n), f32),
        ],
        grid=(bt, n_blocks),
        in_specs=[row, row, a_spec, bc, bc, row, saved],
        out_specs=[row, row, pl.BlockSpec((1, n, bd), lambda b, j: (b, 0, j)), part, part],
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        name="selective_scan_bwd",
    )(u, d, At, B, C, g, states)
    if At.shape[0] == 1:
        dA = dA.sum(0, keepdims=True)
    return du, dd, dA, dB.sum(1), dC.sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(u, d, At, B, C, cfg: _Cfg):
    return _forward_call(u, d, At, B, C, cfg, save_states=False)


def _scan_fwd(u, d, At, B, C, cfg: _Cfg):
    y, states = _forward_call(u, d, At, B, C, cfg, save_states=True)
    return y, (u, d, At, B, C, states)


def _scan_bwd(cfg: _Cfg, res, g):
    u, d, At, B, C, states = res
    grads = _backward_call(u, d, At, B, C, g.astype(jnp.float32), states, cfg)
    return tuple(x.astype(ref.dtype) for x, ref in zip(grads, (u, d, At, B, C)))


_scan.defvjp(_scan_fwd, _scan_bwd)
