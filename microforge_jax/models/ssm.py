"""The BiSSM mixer (Vision-Mamba v2 style, zigzag scan paths) and a one-direction Mamba mode.

`BiSSM`: a shared `in_proj` (to x and the gate z) and `out_proj`; the forward and backward
directions each own a depthwise conv, `x_proj`, `dt_proj`, `A_log` and `D`:

    out = out_proj((y_fwd + y_bwd) * silu(z))

The 2-D depthwise conv runs on the token grid (it is a spatial operator, so it must see the grid
before any permutation); the tokens are then gathered along this layer's zigzag path (ZigMa,
arXiv 2403.13802), scanned forward along the path and backward along the reversed path, and put
back into raster order. Both directions run in one `selective_scan` call, stacked on the batch axis.

`SelectiveSSM` is the Mamba mode of the same code: one direction, raster order, a 1-D causal
depthwise conv; its parameter names are those of transformers' `MambaMixer` (parity test).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from microforge_jax import axes
from microforge_jax.config import BackboneConfig
from microforge_jax.models import layers
from microforge_jax.models.scan import selective_scan
from microforge_jax.models.zigzag import inverse, permute, zigzag_path

Dtype = Any

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4


def dt_bias_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """Mamba's dt bias: softplus(bias) is log-uniform in [DT_MIN, DT_MAX]."""
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN))
    dt = jnp.maximum(dt, DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus


def a_log_init(key: jax.Array, shape: tuple[int, int], dtype: Dtype = jnp.float32) -> jax.Array:
    """S4D-real: A_log[d, n] = log(n + 1), so A = -(1..N) on every row."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def dt_kernel_init(rank: int) -> layers.Initializer:
    """Mamba's dt_proj weight: uniform in +-rank^-0.5 (dt_scale 1)."""
    bound = rank**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------- depthwise conv


def _same_pads(k: int) -> tuple[int, int]:
    """`lax` "SAME" padding of a stride-1 kernel of size k: (lo, hi) = ((k-1)//2, k-1-lo)."""
    return (k - 1) // 2, k - 1 - (k - 1) // 2


def _shift_sum(xp: jax.Array, k: jax.Array, h: int, w: int) -> jax.Array:
    """sum_ij xp[..., i:i+h, j:j+w, :] * k[i, j]: one elementwise fusion, forward and backward."""
    y = None
    for i in range(k.shape[0]):
        for j in range(k.shape[1]):
            t = xp[..., i : i + h, j : j + w, :] * k[i, j]
            y = t if y is None else y + t
    return y


@jax.custom_vjp
def depthwise_conv2d(x_BxHxWxE: jax.Array, kernel_DxKxKxE: jax.Array) -> jax.Array:
    """D depthwise KxK convs (SAME zero padding, stride 1, no bias) of one NHWC input: (D, B, H, W, E).

    Equal to `D` x `nn.Conv(E, (K, K), feature_group_count=E)` with kernels `kernel[d][:, :, None, :]`
    (HWIO), but built from K*K shifted multiply-adds of the padded grid, so the forward pass and the
    hand-written backward (input gradient: the same sum over the flipped kernel; kernel gradient:
    K*K reductions) are elementwise fusions. XLA CPU's grouped-conv backward is ~10x slower at the
    BiSSM shapes (`python -m microforge_jax.bench.scan`). Accumulates in fp32.
    """
    return _dwconv_fwd(x_BxHxWxE, kernel_DxKxKxE)[0]


def _dwconv_fwd(x, k):
    h, w = x.shape[1:3]
    lo, hi = _same_pads(k.shape[1])
    lo_w, hi_w = _same_pads(k.shape[2])
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (lo, hi), (lo_w, hi_w), (0, 0)))
    kf = k.astype(jnp.float32)
    y = jnp.stack([_shift_sum(xp, kf[d], h, w) for d in range(k.shape[0])])
    return y.astype(jnp.result_type(x, k)), (x, k)


def _dwconv_bwd(res, g):
    x, k = res
    h, w = x.shape[1:3]
    (lo, hi), (lo_w, hi_w) = _same_pads(k.shape[1]), _same_pads(k.shape[2])
    gf, kf = g.astype(jnp.float32), k.astype(jnp.float32)
    gp = jnp.pad(gf, ((0, 0), (0, 0), (hi, lo), (hi_w, lo_w), (0, 0)))
    dx = sum(_shift_sum(gp[d], kf[d, ::-1, ::-1], h, w) for d in range(k.shape[0]))
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (lo, hi), (lo_w, hi_w), (0, 0)))
    dk = jnp.stack(
        [
            jnp.stack(
                [
                    jnp.stack([jnp.sum(xp[:, i : i + h, j : j + w, :] * gf[d], (0, 1, 2)) for j in range(k.shape[2])])
                    for i in range(k.shape[1])
                ]
            )
            for d in range(k.shape[0])
        ]
    )
    return dx.astype(x.dtype), dk.astype(k.dtype)


depthwise_conv2d.defvjp(_dwconv_fwd, _dwconv_bwd)


class _DepthwiseConvParams(nn.Module):
    """The parameters of `nn.Conv(E, (K, K), feature_group_count=E)`: `kernel` (K, K, 1, E), `bias` (E,).

    Same names, shapes, logical axes, initialisers and init RNG path as the `layers.conv` it
    replaces, so checkpoints and the export are unchanged; the conv itself is `depthwise_conv2d`.
    """

    features: int
    kernel_size: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        k, e = self.kernel_size, self.features
        names = (axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.MLP)
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(layers.default_kernel_init, names), (k, k, 1, e), self.param_dtype
        )
        bias = self.param("bias", nn.with_logical_partitioning(layers.zeros, names[-1:]), (e,), self.param_dtype)
        return kernel, bias


# ----------------------------------------------------------------------------- scan inputs


def _scan_inputs(
    module: nn.Module,
    prefix: str,
    u_BxLxE: jax.Array,
    cfg: BackboneConfig,
    dtype: Dtype,
    param_dtype: Dtype,
) -> tuple[jax.Array, ...]:
    """Creates one direction's `x_proj`, `dt_proj`, `A_log`, `D` on `module` and applies them.

    Args:
      module: the (compact) module that owns the parameters.
      prefix: parameter-name prefix ("fwd_", "bwd_" or "" in Mamba mode).
      u_BxLxE: the direction's tokens after conv and SiLU, in scan order.

    Returns:
      (delta_BxLxE fp32, A_ExN fp32, B_BxLxN, C_BxLxN, D_E fp32).
    """
    inner, state, rank = cfg.ssm_inner, cfg.ssm_state, cfg.ssm_dt_rank
    x_dbl = layers.dense(
        rank + 2 * state,
        (axes.MLP, None),
        dtype=dtype,
        param_dtype=param_dtype,
        use_bias=False,
        name=f"{prefix}x_proj",
    )(u_BxLxE)
    dt_BxLxR, B_BxLxN, C_BxLxN = jnp.split(x_dbl, [rank, rank + state], axis=-1)
    dt_BxLxE = layers.dense(
        inner,
        (axes.RANK, axes.MLP),
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=dt_kernel_init(rank),
        bias_init=dt_bias_init,
        name=f"{prefix}dt_proj",
    )(dt_BxLxR)
    # fp32 island: the step size and the decay it drives (bf16 turns exp(-0.001) into 1).
    delta = jax.nn.softplus(dt_BxLxE.astype(jnp.float32))
    A_log = layers.param(module, f"{prefix}A_log", a_log_init, (inner, state), (axes.MLP, axes.STATE), param_dtype)
    D = layers.param(module, f"{prefix}D", layers.ones, (inner,), (axes.MLP,), param_dtype)
    A = -jnp.exp(A_log.astype(jnp.float32))
    return delta, A, B_BxLxN, C_BxLxN, D.astype(jnp.float32)


class BiSSM(nn.Module):
    """Bidirectional selective-scan mixer over a token grid, scanned along a zigzag path.

    Attributes:
      cfg: the backbone config (dim, ssm_expand, ssm_state, dt_rank, conv_kernel, scan_impl,
        scan_chunk, use_dwconv).
      layer_index: selects this layer's zigzag path (paths cycle from layer to layer).
      dtype: compute dtype of the projections and convs (the scan itself is fp32).
      param_dtype: parameter dtype.
      reference_graph: build the original (slower on CPU) graph: grouped `nn.Conv`s and
        autodiffed gathers. Same parameters and outputs; for tests and benchmarks.
    """

    cfg: BackboneConfig
    layer_index: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    reference_graph: bool = False

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
        """Mixes tokens.

        Args:
          x_BxLxD: tokens in raster order of the grid.
          grid_hw: static (H, W) with H * W == L ((H, 2W) for editing's [target | source]).

        Returns:
          (B, L, D) in `dtype`.
        """
        cfg = self.cfg
        h, w = grid_hw
        b, length, dim = x_BxLxD.shape
        if h * w != length:
            raise ValueError(f"grid {grid_hw} has {h * w} tokens, the input has {length}")
        inner = cfg.ssm_inner
        xz = layers.dense(
            2 * inner,
            (axes.EMBED, axes.MLP),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=False,
            name="in_proj",
        )(x_BxLxD)
        x_BxLxE, z_BxLxE = jnp.split(xz, 2, axis=-1)

        perm = zigzag_path(h, w, self.layer_index)
        if self.reference_graph:
            y = self._mix_reference(x_BxLxE, perm, b, h, w)
        else:
            y = self._mix(x_BxLxE, perm, b, h, w)
        y = y.astype(self.dtype) * nn.silu(z_BxLxE)
        return layers.dense(
            dim,
            (axes.MLP, axes.EMBED),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=False,
            name="out_proj",
        )(y)

    def _mix(self, x_BxLxE: jax.Array, perm, b: int, h: int, w: int) -> jax.Array:
        """Both directions' conv -> SiLU -> path order -> scan -> raster order, summed.

        Built for XLA CPU: both depthwise convs in one shifted-add `depthwise_conv2d` call; the
        backward path is the forward path reversed, so one gather (`permute`, whose backward is the
        inverse gather) orders both directions and a flip of the time axis makes the second one.
        """
        cfg, inner, length = self.cfg, self.cfg.ssm_inner, h * w
        prefixes = ("fwd_", "bwd_")
        if cfg.use_dwconv:
            params = [
                _DepthwiseConvParams(inner, cfg.conv_kernel, self.param_dtype, name=f"{p}conv")() for p in prefixes
            ]
            kernel = jnp.stack([k[:, :, 0, :] for k, _ in params]).astype(self.dtype)
            bias = jnp.stack([bb for _, bb in params]).astype(self.dtype)
            u2 = depthwise_conv2d(x_BxLxE.reshape(b, h, w, inner), kernel) + bias[:, None, None, None, :]
            u2 = u2.reshape(2, b, length, inner)
        else:
            u2 = jnp.broadcast_to(x_BxLxE, (2, b, length, inner))
        u2 = permute(nn.silu(u2), perm, axis=2)
        u2 = jnp.concatenate([u2[:1], jnp.flip(u2[1:], 2)], 0)  # path order, reversed path order
        scan_in = [_scan_inputs(self, p, u2[i], cfg, self.dtype, self.param_dtype) for i, p in enumerate(prefixes)]
        # One scan call for both directions, stacked on the batch axis: half the launches.
        delta2, B2, C2 = (jnp.concatenate([s[i] for s in scan_in], 0) for i in (0, 2, 3))
        A2 = jnp.repeat(jnp.stack([s[1] for s in scan_in]), b, axis=0)
        D2 = jnp.repeat(jnp.stack([s[4] for s in scan_in]), b, axis=0)
        y2 = selective_scan(
            u2.reshape(2 * b, length, inner), delta2, A2, B2, C2, D2, impl=cfg.scan_impl, chunk=cfg.scan_chunk
        )
        # y_fwd[:, inverse(perm)] + y_bwd[:, inverse(perm[::-1])], with one gather.
        return permute(y2[:b] + jnp.flip(y2[b:], 1), inverse(perm), axis=1)

    def _mix_reference(self, x_BxLxE: jax.Array, perm, b: int, h: int, w: int) -> jax.Array:
        """The original graph (grouped `nn.Conv` per direction, autodiffed gathers); same parameters."""
        cfg, inner, length = self.cfg, self.cfg.ssm_inner, h * w
        orders = {"fwd_": perm, "bwd_": perm[::-1].copy()}
        us, scan_in = [], []
        for prefix, order in orders.items():
            u = x_BxLxE
            if cfg.use_dwconv:
                k = cfg.conv_kernel
                u = layers.conv(
                    inner,
                    (k, k),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    feature_group_count=inner,
                    names=(axes.CONV_H, axes.CONV_W, axes.CONV_IN, axes.MLP),
                    name=f"{prefix}conv",
                )(u.reshape(b, h, w, inner)).reshape(b, length, inner)
            u = nn.silu(u)[:, order]
            us.append(u)
            scan_in.append(_scan_inputs(self, prefix, u, cfg, self.dtype, self.param_dtype))
        u2 = jnp.concatenate(us, 0)
        delta2, B2, C2 = (jnp.concatenate([s[i] for s in scan_in], 0) for i in (0, 2, 3))
        A2 = jnp.repeat(jnp.stack([s[1] for s in scan_in]), b, axis=0)
        D2 = jnp.repeat(jnp.stack([s[4] for s in scan_in]), b, axis=0)
        y2 = selective_scan(u2, delta2, A2, B2, C2, D2, impl=cfg.scan_impl, chunk=cfg.scan_chunk)
        y_fwd, y_bwd = y2[:b], y2[b:]
        return y_fwd[:, inverse(orders["fwd_"])] + y_bwd[:, inverse(orders["bwd_"])]


class SelectiveSSM(nn.Module):
    """Mamba mode: one direction, raster order, 1-D causal depthwise conv (transformers' `MambaMixer`).

    Parameter names follow `MambaMixer` (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`,
    `out_proj`) so a checkpoint maps one to one.

    Attributes:
      cfg: the backbone config; `conv_kernel` is overridden by `kernel`.
      kernel: causal conv width (Mamba: 4).
      dtype, param_dtype: compute and parameter dtypes.
    """

    cfg: BackboneConfig
    kernel: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """Args: x_BxLxD. Returns: (B, L, D) in `dtype`."""
        cfg, inner = self.cfg, self.cfg.ssm_inner
        xz = layers.dense(
            2 * inner,
            (axes.EMBED, axes.MLP),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=False,
            name="in_proj",
        )(x_BxLxD)
        x_BxLxE, z_BxLxE = jnp.split(xz, 2, axis=-1)
        if cfg.use_dwconv:
            x_BxLxE = layers.conv(
                inner,
                (self.kernel,),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                feature_group_count=inner,
                padding=((self.kernel - 1, 0),),
                names=(axes.CONV_W, axes.CONV_IN, axes.MLP),
                name="conv1d",
            )(x_BxLxE)
        u = nn.silu(x_BxLxE)
        delta, A, B, C, D = _scan_inputs(self, "", u, cfg, self.dtype, self.param_dtype)
        y = selective_scan(u, delta, A, B, C, D, impl=cfg.scan_impl, chunk=cfg.scan_chunk)
        y = y.astype(self.dtype) * nn.silu(z_BxLxE)
        return layers.dense(
            x_BxLxD.shape[-1],
            (axes.MLP, axes.EMBED),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_bias=False,
            name="out_proj",
        )(y)
