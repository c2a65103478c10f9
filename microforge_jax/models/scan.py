"""The Mamba-1 selective scan, four ways behind one function (plus the native and Pallas kernels).

    a_t = exp(delta_t * A)          b_t = delta_t * B_t * u_t
    h_t = a_t * h_{t-1} + b_t       y_t = sum_n h_t * C_t + D * u_t

- "sequential": `lax.scan` over L with a cache-resident state and a hand-written reverse-scan
  backward (`custom_vjp`). The fastest form on CPU, where XLA runs a loop body's few fusions
  cheaply but pays for every pass over an L x D x N tensor in memory bandwidth.
- "associative": `lax.associative_scan` over the materialised (Bt, L, N, Din) `a` and `b`; the
  parallel form for GPU/TPU, plain autodiff.
- "chunked": `lax.scan` over chunks of `chunk` tokens with an associative scan inside each chunk
  and the state carried across chunks; a `custom_vjp` keeps only the chunk-start states and
  recomputes each chunk in the backward pass, so no (Bt, L, N, Din) tensor exists in either pass.
- "native": one fused C++ kernel per pass on CPU (`kernels/native_scan.py`, called through the XLA FFI,
  compiled on first use): each token's update is one pass over the cache-resident state, and the
  backward recomputes chunks from saved chunk-start states. The default on CPU where a compiler works.
- "pallas": one fused Pallas kernel per pass (`kernels/pallas_scan.py`: Triton on GPU, the Pallas
  interpreter on CPU, where it is only for tests): the state stays in registers, each input is
  read once, the backward recomputes chunks from saved chunk-start states.

Internally the state is laid out (Bt, N, Din), Din innermost: `delta`, `u` broadcast along the
contiguous axis and the reductions over N are vector adds (measured faster on CPU than (Bt, Din, N)).
The discretisation, the state and all accumulations are fp32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from microforge_jax.kernels import native_scan, pallas_scan

IMPLS = ("auto", "associative", "chunked", "sequential", "native", "pallas")


def auto_impl(backend: str | None = None) -> str:
    """The scan form "auto" resolves to on `backend` (default: `jax.default_backend()`).

    CPU: "native" on one device where the C++ kernel builds (2-core AMD EPYC, 2026-11-27, quiet: 2.4x
    the sequential form forward and 6.3x forward+backward at (4, 1024, 512, 16); BENCHMARKS.md), else
    "sequential".
    Before the kernel: `python -m microforge_jax.bench.scan` (2-core Xeon, 2026-11-26): fastest
    forward at every shape (2-4x chunked, 10-25x associative) and fastest fwd+bwd at the nano shapes
    and the mock 6-block step; chunked (chunk 8) won fwd+bwd at the tiny shape (244 vs 362 ms).
    The associative form pays for passes over L x D x N tensors in memory. With the dot-reduction
    backward (same day), the mock step's fwd+bwd is 1202 ms sequential vs 3563 ms chunked (chunk 8).
    GPU: "pallas" when this JAX has the Pallas Triton backend, else "associative". On an H200
    (jax 0.11.2, 2026-11-26) the fused kernel ran the scan 4.3-5.9x faster forward and 4.8-6.6x
    faster forward+backward than "associative" at Bt=64, Din=768, N=16, L = 256 / 1024, and small's
    512 px bf16 flow step in 52 ms instead of 278 ms (BENCHMARKS.md, "On a GPU").
    TPU: "associative" (the kernel is written for Triton; not measured on a TPU).
    """
    backend = backend or jax.default_backend()
    if backend == "cpu":
        # The kernel is not batch-partitioned: on several devices XLA would gather a sharded batch
        # and run every row on each device, so multi-device CPU jobs (tests, gloo) keep lax.scan.
        one_device = jax.device_count("cpu") == 1
        return "native" if one_device and native_scan.available() else "sequential"
    if backend in ("gpu", "cuda", "rocm") and pallas_scan.triton_available():
        return "pallas"
    return "associative"


def selective_scan(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array,
    *,
    impl: str = "auto",
    chunk: int = 32,
) -> jax.Array:
    """Mamba-1 selective scan from a zero state.

    Args:
      u: (Bt, L, Din) input.
      delta: (Bt, L, Din) positive step sizes (softplus already applied).
      A: (Din, N) negative decay rates (= -exp(A_log)), or (Bt, Din, N) to give each batch row its
        own (used to run both BiSSM directions in one call).
      B, C: (Bt, L, N) input and output projections of the state.
      D: (Din,) skip connection, or (Bt, Din).
      impl: "auto", "associative", "chunked", "sequential", "native" (CPU only) or "pallas".
      chunk: chunk length of the chunked form (the pallas form keeps its own, `pallas_scan.CHUNK`:
        there it sets the backward's register use, not a CPU loop's cost).

    Returns:
      y: (Bt, L, Din) in `u`'s dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown scan impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = auto_impl()
    bt, length, din = u.shape
    if A.ndim == 2:
        A = A[None]
    if D.ndim == 1:
        D = D[None]
    n = A.shape[-1]
    if A.shape[-2:] != (din, n) or A.shape[0] not in (1, bt) or B.shape != (bt, length, n) or C.shape != B.shape:
        raise ValueError(f"shape mismatch: u {u.shape}, delta {delta.shape}, A {A.shape}, B {B.shape}, C {C.shape}")
    # fp32 island: in bf16 exp(delta * A) rounds to 1 for small steps and the decay vanishes.
    f32 = jnp.float32
    At = jnp.swapaxes(A.astype(f32), -1, -2)  # (Ba, N, Din)
    if impl == "native":
        if jax.default_backend() != "cpu":
            raise ValueError(f"scan impl 'native' is the CPU kernel; on {jax.default_backend()} use 'auto'")
        y = native_scan.selective_scan_native(u, delta, jnp.broadcast_to(At, (bt, n, din)), B, C)
    elif impl == "pallas":
        # Batch-major and in the input dtype: the kernel reads each row once and converts in registers.
        y = pallas_scan.selective_scan_pallas(u, delta, At, B, C)
    else:
        uf, df, Bf, Cf = (jnp.swapaxes(x.astype(f32), 0, 1) for x in (u, delta, B, C))  # time-major
        if impl == "sequential":
            y = _sequential(uf, df, At, Bf, Cf)
        elif impl == "chunked":
            y = _chunked(uf, df, At, Bf, Cf, chunk)
        else:
            y = _associative(uf, df, At, Bf, Cf)
        y = jnp.swapaxes(y, 0, 1)
    y = y + u.astype(f32) * D.astype(f32)[:, None, :]
    return y.astype(u.dtype)


# ----------------------------------------------------------------------------- shared pieces
# Time-major arrays: u, delta, g: (L, Bt, Din); B, C: (L, Bt, N); At: (Ba, N, Din), Ba in {1, Bt};
# the state h: (Bt, N, Din).


def _decay(d, At):
    return jnp.exp(d[..., None, :] * At)


def _inject(d, u, B):
    return (d * u)[..., None, :] * B[..., :, None]


def _combine(x, y):
    """(a1, b1) o (a2, b2) = (a2 a1, a2 b1 + b2): apply step 1 then step 2."""
    return y[0] * x[0], y[0] * x[1] + y[1]


def _reduce_dA(q, At):
    """Sums a (..., Bt, N, Din) dA contribution down to At's shape."""
    q = q.reshape(-1, *q.shape[-3:]).sum(0)
    return q.sum(0, keepdims=True) if At.shape[0] == 1 else q


def _state_grads(u, d, At, B, g, lam, h, hprev):
    """Vectorised parameter/input gradients given the adjoint `lam` = dL/dh_t (any leading time dims).

    Returns du (without the D skip), ddelta, dAt, dB, dC.
    """
    a = _decay(d, At)
    du_dt = d * u
    dC = jnp.sum(h * g[..., None, :], -1)
    dB = jnp.sum(lam * du_dt[..., None, :], -1)
    s = jnp.sum(lam * B[..., :, None], -2)
    q = lam * hprev * a
    ddelta = s * u + jnp.sum(q * At, -2)
    return s * d, ddelta, _reduce_dA(q * d[..., None, :], At), dB, dC


# ----------------------------------------------------------------------------- associative


def _associative(u, d, At, B, C):
    a = _decay(d, At)
    b = _inject(d, u, B)
    _, h = lax.associative_scan(_combine, (a, b), axis=0)
    return jnp.sum(h * C[..., :, None], -2)


# ----------------------------------------------------------------------------- sequential


def _seq_forward(u, d, At, B, C, keep_states: bool):
    """Forward loop; with `keep_states` also returns the state *entering* each step, h_{t-1}.

    Keeping h_{t-1} (not h_t) hands the backward step both states it needs (it rebuilds h_t in
    registers) without a shifted copy of the (L, Bt, N, Din) history.
    """
    h0 = jnp.zeros((u.shape[1], At.shape[1], u.shape[2]), jnp.float32)

    def step(h, x):
        ut, dt, bt, ct = x
        h_new = _decay(dt, At) * h + _inject(dt, ut, bt)
        y = jnp.sum(h_new * ct[:, :, None], 1)
        return h_new, ((y, h) if keep_states else y)

    return lax.scan(step, h0, (u, d, B, C))[1]


@jax.custom_vjp
def _sequential(u, d, At, B, C):
    return _seq_forward(u, d, At, B, C, keep_states=False)


def _sequential_fwd(u, d, At, B, C):
    y, hprev = _seq_forward(u, d, At, B, C, keep_states=True)
    return y, (u, d, At, B, C, hprev)


def _sequential_bwd(res, g):
    # A reverse scan carrying the adjoint lam_t = g_t C_t + a_{t+1} lam_{t+1} and dA, reducing in the
    # body (autodiff of the forward body: ~20 small fusions per step, 1.5x slower). The three
    # contractions over one axis of the (Bt, N, Din) state are batched dots, not broadcast-multiply
    # + reduce: XLA CPU materialises every broadcast operand of a reduction at full state size, and
    # the dots skip that (~0.75x the step time, `python -m microforge_jax.bench.scan`). Vectorising
    # the gradients over the whole time axis (or over chunks of it) was 2-4x slower: each extra
    # pass over an (L, Bt, N, Din) tensor costs more than the loop overhead it saves.
    u, d, At, B, C, hprevs = res

    def step(carry, x):
        lam_next, dA = carry
        ut, dt, bt, ct, gt, hp = x
        a = _decay(dt, At)
        du_dt = dt * ut
        lam = gt[:, None, :] * ct[:, :, None] + lam_next
        h = a * hp + du_dt[:, None, :] * bt[:, :, None]
        dC = jnp.einsum("bnd,bd->bn", h, gt)
        dB = jnp.einsum("bnd,bd->bn", lam, du_dt)
        s = jnp.einsum("bnd,bn->bd", lam, bt)
        q = lam * hp * a
        ddelta = s * ut + jnp.sum(q * At, -2)
        return (a * lam, dA + q * dt[:, None, :]), (s * dt, ddelta, dB, dC)

    init = (jnp.zeros_like(hprevs[0]), jnp.zeros_like(hprevs[0]))
    (_, dA), (du, ddelta, dB, dC) = lax.scan(step, init, (u, d, B, C, g, hprevs), reverse=True)
    return du, ddelta, _reduce_dA(dA[None], At), dB, dC


_sequential.defvjp(_sequential_fwd, _sequential_bwd)


# The previous backward (kept for `python -m microforge_jax.bench.scan`'s before/after columns).
def _sequential_fwd_v1(u, d, At, B, C):
    h0 = jnp.zeros((u.shape[1], At.shape[1], u.shape[2]), jnp.float32)

    def step(h, x):
        ut, dt, bt, ct = x
        h = _decay(dt, At) * h + _inject(dt, ut, bt)
        return h, (jnp.sum(h * ct[:, :, None], 1), h)

    y, hs = lax.scan(step, h0, (u, d, B, C))[1]
    return y, (u, d, At, B, C, hs)


def _sequential_bwd_v1(res, g):
    u, d, At, B, C, hs = res
    hprev = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]], 0)

    def step(carry, x):
        lam_next, dAt = carry
        ut, dt, bt, ct, gt, hp = x
        a = _decay(dt, At)
        lam = gt[:, None, :] * ct[:, :, None] + lam_next
        h = a * hp + _inject(dt, ut, bt)
        du, ddelta, dA_t, dB, dC = _state_grads(ut, dt, At, bt, gt, lam, h, hp)
        return (a * lam, dAt + dA_t), (du, ddelta, dB, dC)

    init = (jnp.zeros_like(hprev[0]), jnp.zeros_like(At))
    (_, dAt), (du, ddelta, dB, dC) = lax.scan(step, init, (u, d, B, C, g, hprev), reverse=True)
    return du, ddelta, dAt, dB, dC


_sequential_v1 = jax.custom_vjp(lambda u, d, At, B, C: _seq_forward(u, d, At, B, C, keep_states=False))
_sequential_v1.defvjp(_sequential_fwd_v1, _sequential_bwd_v1)


# ----------------------------------------------------------------------------- chunked


def _chunked(u, d, At, B, C, chunk: int):
    length = u.shape[0]
    t = max(1, min(chunk, length))
    pad = -length % t
    if pad:
        # delta = 0 gives a_t = 1 and b_t = 0: padded steps carry the state through unchanged.
        u, d, B, C = (jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) for x in (u, d, B, C))
    split = lambda x: x.reshape(-1, t, *x.shape[1:])
    y = _chunked_scan(split(u), split(d), At, split(B), split(C))
    return y.reshape(-1, *y.shape[2:])[:length]


def _chunk_states(h0, u, d, At, B):
    """States h_1..h_T of one chunk from its start state h0; (T, Bt, N, Din)."""
    a = _decay(d, At)
    b = _inject(d, u, B).at[0].add(a[0] * h0)
    return lax.associative_scan(_combine, (a, b), axis=0)[1]


def _chunked_forward(u, d, At, B, C):
    h0 = jnp.zeros((u.shape[2], At.shape[1], u.shape[3]), jnp.float32)

    def step(h, x):
        ut, dt, bt, ct = x
        hs = _chunk_states(h, ut, dt, At, bt)
        return hs[-1], (jnp.sum(hs * ct[..., :, None], -2), h)

    _, (y, starts) = lax.scan(step, h0, (u, d, B, C))
    return y, starts


@jax.custom_vjp
def _chunked_scan(u, d, At, B, C):
    return _chunked_forward(u, d, At, B, C)[0]


def _chunked_scan_fwd(u, d, At, B, C):
    y, starts = _chunked_forward(u, d, At, B, C)
    return y, (u, d, At, B, C, starts)


def _chunked_scan_bwd(res, g):
    u, d, At, B, C, starts = res

    def step(carry, x):
        lam_in, dAt = carry  # lam_in = a_{T+1} lam_{T+1}, the adjoint flowing back from the next chunk
        ut, dt, bt, ct, gt, h0 = x
        hs = _chunk_states(h0, ut, dt, At, bt)
        hprev = jnp.concatenate([h0[None], hs[:-1]], 0)
        a = _decay(dt, At)
        # lam_t = g_t C_t + a_{t+1} lam_{t+1}: the same linear recurrence, run backwards in time.
        c = (gt[..., None, :] * ct[..., :, None]).at[-1].add(lam_in)
        a_next = jnp.concatenate([a[1:], jnp.ones_like(a[:1])], 0)
        lam = lax.associative_scan(_combine, (a_next, c), axis=0, reverse=True)[1]
        du, ddelta, dA_c, dB, dC = _state_grads(ut, dt, At, bt, gt, lam, hs, hprev)
        return (a[0] * lam[0], dAt + dA_c), (du, ddelta, dB, dC)

    init = (jnp.zeros_like(starts[0]), jnp.zeros_like(At))
    (_, dAt), (du, ddelta, dB, dC) = lax.scan(step, init, (u, d, B, C, g, starts), reverse=True)
    return du, ddelta, dAt, dB, dC


_chunked_scan.defvjp(_chunked_scan_fwd, _chunked_scan_bwd)


@functools.partial(jax.jit, static_argnames=("impl", "chunk"))
def selective_scan_jit(u, delta, A, B, C, D, *, impl: str = "auto", chunk: int = 32) -> jax.Array:
    """`selective_scan` under `jax.jit` (for benchmarks and tests)."""
    return selective_scan(u, delta, A, B, C, D, impl=impl, chunk=chunk)
